"""The streaming stage-1 driver for per-tensor methods: merge K checkpoints into an atomic output folder.

    plan_merge(recipe)                  merge/plan.py: headers and configs only; every defect is
                                        found before any tensor is read or anything is written
    merge_tensors(plan, names, writer)  merge/tensors.py: the loop, one tensor at a time
    merge_per_tensor(recipe, out_dir)   here: both, plus config, tokenizer and model card, then
                                        finalize (whole shards, by one process or per rank under
                                        torchrun, resumable after a kill: merge/distributed.py)

Every output tensor keeps the on-disk name, shape and layout of the reference model (the base, or
the first source when there is none), so per-expert and fused checkpoints both come out as they
went in. Stage-1 `regmean`, which also needs the calibration walk, is composed above this package
(moemerge/pipeline/stage1.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moemerge import __version__
from moemerge.checkpoint.card import model_card
from moemerge.checkpoint.reader import folder_stamp
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.merge.distributed import merge_sharded
from moemerge.merge.plan import MergePlan, plan_merge
from moemerge.merge.recipe import MergeRecipe


def _output_config(plan: MergePlan, source_dir: str) -> str | None:
    """config.json of `source_dir` with the output dtype, or None when it already says so."""
    path = Path(source_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    dtype = plan.recipe.output_dtype
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
    if all(config.get(k) == dtype for k in keys):
        return None
    for key in keys:
        config[key] = dtype
    return json.dumps(config, indent=2) + "\n"


def _summary(plan: MergePlan) -> str:
    routers = {"merge": "merged like every other tensor", "base": "copied from the base"}.get(
        plan.recipe.routers, f"copied from `{plan.recipe.routers}`"
    )
    return (
        f"Stage-1 merge of {len(plan.sources)} model(s) with `{plan.method.name}` "
        f"({len(plan.names)} tensors, work dtype {plan.recipe.work_dtype}, output dtype "
        f"{plan.recipe.output_dtype}); routers {routers}. No router calibration (stage 2) has been applied."
    )


def resume_key(recipe: MergeRecipe, recipe_text: str, *, device: str, max_shard_bytes: int) -> str:
    """Everything a stage-1 output's bytes depend on: version, recipe, shard size, device, every input folder's files.

    A killed merge's finished shards are kept under this key, and reused only by a run with the same one.
    """
    digest = hashlib.sha256()
    settings = [__version__, recipe_text, recipe.model_dump(mode="json"), device, max_shard_bytes]
    digest.update(json.dumps(settings, default=str).encode())
    inputs = [*([recipe.base_model] if recipe.base_model else []), *recipe.source_paths, recipe.tokenizer_model]
    for folder in dict.fromkeys(inputs):
        digest.update(json.dumps(folder_stamp(folder)).encode())
    return digest.hexdigest()


def merge_per_tensor(
    recipe: MergeRecipe,
    out_dir: Path,
    *,
    overwrite: bool,
    device: str,
    max_shard_bytes: int,
    progress: bool,
    recipe_text: str,
) -> Path:
    """Run a per-tensor stage-1 recipe into `out_dir` atomically (the caller has checked `out_dir`).

    Every check (configs, tensor names, shapes, parameters) runs before anything is written; a
    failure later removes the temporary folder, so `out_dir` is either complete or untouched. A
    killed run leaves its finished shards, which the rerun adopts (merge/distributed.py).
    """
    plan = plan_merge(recipe)
    key = resume_key(recipe, recipe_text, device=device, max_shard_bytes=max_shard_bytes)

    def finish(writer: CheckpointWriter) -> None:
        writer.copy_support_files(recipe.tokenizer_model)
        config = _output_config(plan, recipe.tokenizer_model)
        if config is not None:
            writer.write_text("config.json", config)
        card = model_card(recipe=recipe_text, sources=list(plan.sources), base=plan.base, summary=_summary(plan))
        writer.write_text("README.md", card)

    try:  # whole shards, by one process or by each rank under torchrun
        sharded = {"overwrite": overwrite, "device": device, "max_shard_bytes": max_shard_bytes, "resume_key": key}
        return merge_sharded(plan, out_dir, finish, progress=progress, **sharded)
    finally:
        for reader in plan.readers.values():
            reader.close()
