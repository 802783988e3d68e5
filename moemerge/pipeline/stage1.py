"""Stage 1 of a recipe: the output checks every method shares, then the per-tensor driver or `regmean`."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from moemerge.checkpoint.lock import folder_lock
from moemerge.config import Recipe, load_recipe
from moemerge.merge.driver import merge_per_tensor
from moemerge.merge.plan import MergeError, resolve_device
from moemerge.pipeline.regmean import METHOD as REGMEAN
from moemerge.pipeline.regmean import merge_regmean
from moemerge.units import parse_size

LOG = logging.getLogger(__name__)


def _recipe_text(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_defaults=True), sort_keys=False)


def merge_checkpoints(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    max_shard_bytes: int | str = "2GB",
    progress: bool = True,
    recipe_text: str | None = None,
    max_memory: str | None = None,
) -> Path:
    """Run stage 1 of `recipe` (a Recipe or a YAML path) into `out_dir`, atomically; returns `out_dir`.

    Every check (configs, tensor names, shapes, parameters) runs before anything is written; a
    failure later removes the temporary folder, so `out_dir` is either complete or untouched. A
    killed run resumes from the shards it finished when run again. `max_memory` (``--max-memory``)
    replaces ``calibrate.max_memory`` for the walk of ``regmean``. A per-tensor merge plans no memory (a
    warning says so): it holds the output shard being filled (``max_shard_bytes``) and K+1 work-dtype copies of
    one tensor, or of one block of rows of it with a row-separable method (merge/tensors.py).
    """
    if isinstance(recipe, str | Path):
        recipe_text = recipe_text or Path(recipe).read_text()
        recipe = load_recipe(recipe)
    recipe_text = recipe_text or _recipe_text(recipe)
    if max_memory is not None and recipe.merge_method == REGMEAN:
        recipe = recipe.model_copy(update={"calibrate": recipe.calibrate.model_copy(update={"max_memory": max_memory})})
    elif max_memory is not None:
        LOG.warning(
            "--max-memory %s: %s merges tensor by tensor and plans no memory: it holds one output shard "
            "(--max-shard-size) and K+1 work-dtype copies of one tensor (or of a block of its rows)",
            max_memory,
            recipe.merge_method,
        )
    out_dir = Path(out_dir)
    with folder_lock(out_dir):  # a second run into `out_dir` is refused, naming this one
        return _merge_locked(recipe, out_dir, overwrite, device, max_shard_bytes, progress, recipe_text)


def _merge_locked(
    recipe: Recipe,
    out_dir: Path,
    overwrite: bool,
    device: str,
    max_shard_bytes: int | str,
    progress: bool,
    recipe_text: str,
) -> Path:
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir}: output exists; pass --overwrite to replace it")
    inputs = {Path(p).resolve() for p in [*recipe.source_paths, *([recipe.base_model] if recipe.base_model else [])]}
    if out_dir.resolve() in inputs:
        raise MergeError(f"{out_dir}: the output folder is one of the input models")
    try:
        shard_bytes = parse_size(max_shard_bytes)
    except ValueError as err:
        raise MergeError(f"--max-shard-size: {err}") from None
    settings = {
        "overwrite": overwrite,
        "device": resolve_device(device),
        "max_shard_bytes": shard_bytes,
        "progress": progress,
        "recipe_text": recipe_text,
    }
    if recipe.merge_method == REGMEAN:  # needs activations: a per-tensor merge, then the calibration walk
        return merge_regmean(recipe, out_dir, **settings)
    return merge_per_tensor(recipe, out_dir, **settings)
