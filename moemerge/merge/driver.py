"""The streaming stage-1 driver: merge K checkpoints tensor by tensor into an atomic output folder.

    plan_merge(recipe)                  headers and configs only: every defect is found before any
                                        tensor is read or anything is written
    merge_tensors(plan, names, writer)  the loop: for each on-disk name read base + K sources,
                                        cast to the work dtype on the device, run the kernel, cast
                                        to the output dtype, hand to the writer, drop
    merge_checkpoints(recipe, out_dir)  both, plus config, tokenizer and model card, then finalize

At any time the loop holds the K+1 versions of ONE tensor (plus the kernel's temporaries and the
writer's current shard). Every output tensor keeps the on-disk name, shape and layout of the
reference model (the base, or the first source when there is none), so per-expert and fused
checkpoints both come out as they went in. `merge_tensors` takes any list of names, so a
distributed version can give each rank its own subset and writer.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemerge.checkpoint.reader import CheckpointReader
from moemerge.config import Recipe, load_recipe, resolve_parameters

if TYPE_CHECKING:
    import torch

    from moemerge.checkpoint.writer import CheckpointWriter
    from moemerge.merge.registry import MergeMethod, Params

LOG = logging.getLogger(__name__)

COMPATIBILITY_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_k",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "first_k_dense_replace",
    "decoder_sparse_step",
    "mlp_only_layers",
    "tie_word_embeddings",
)
"""Config fields that must agree between base and sources (those a config has are compared):
a difference in any of them means the tensors do not correspond even when their shapes do."""

_UNMERGEABLE_DTYPES = ("F8_E4M3", "F8_E5M2")
RELEASE_BYTES = 64 * 2**20
"""Bytes a reader may read before its memory-mapped shards are closed (see `merge_tensors`)."""


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the model folder and the tensor or field."""


@dataclass(frozen=True)
class MergePlan:
    """Everything the tensor loop needs, derived from headers and configs alone.

    `reference` is the model whose names, shapes and layout the output keeps. `copy_from` maps
    the names that are copied rather than merged (router tensors under `routers: base|<source>`)
    to the model they come from. `params` holds the parsed parameters of each name.
    """

    recipe: Recipe
    method: MergeMethod
    base: str | None
    sources: tuple[str, ...]
    reference: str
    names: tuple[str, ...]
    copy_from: Mapping[str, str]
    linear_weights: frozenset[str]
    params: Mapping[str, tuple[Params, list[Params]]]
    readers: dict[str, CheckpointReader] = field(repr=False)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500 * 2**20 (the units `save_pretrained` accepts); ints are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise MergeError(f"shard size {text!r}: expected a number of bytes or e.g. 2GB, 500MB, 1GiB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * scale[unit])


def resolve_device(device: str) -> str:
    """The device to merge on: `cuda` when asked for and present, else the CPU (with a warning)."""
    import torch

    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return device
        LOG.warning("--device %s asked for but no GPU is available; merging on the CPU", device)
        return "cpu"
    if device != "cpu":
        raise MergeError(f"device {device!r}: use cpu or cuda")
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Planning: configs and headers, nothing read.


def _check_configs(base: str, base_cfg: dict[str, Any], other: str, other_cfg: dict[str, Any]) -> None:
    for scope, left, right in _config_scopes(base_cfg, other_cfg):
        for key in COMPATIBILITY_KEYS:
            if key not in left and key not in right:
                continue
            if left.get(key) != right.get(key):
                raise MergeError(
                    f"{other}: config field {scope}{key} is {right.get(key)!r} but {left.get(key)!r} in {base}; "
                    "the models are not fine-tunes of one architecture"
                )


def _config_scopes(left: dict[str, Any], right: dict[str, Any]) -> Iterable[tuple[str, dict, dict]]:
    """The top level, and the nested text config multimodal wrappers keep their LM sizes in."""
    yield "", left, right
    if isinstance(left.get("text_config"), dict) or isinstance(right.get("text_config"), dict):
        yield "text_config.", left.get("text_config") or {}, right.get("text_config") or {}


def _check_headers(reference: CheckpointReader, other: CheckpointReader) -> None:
    ref_names, other_names = set(reference.names()), set(other.names())
    for name in reference.names():
        if name not in other_names:
            raise MergeError(f"{other.model_dir}: tensor {name} is missing (present in {reference.model_dir})")
        want, got = reference.info(name), other.info(name)
        if want.shape != got.shape:
            raise MergeError(
                f"{other.model_dir}: tensor {name} has shape {list(got.shape)}, "
                f"expected {list(want.shape)} as in {reference.model_dir}"
            )
        if _is_float_code(want.dtype) != _is_float_code(got.dtype):
            raise MergeError(
                f"{other.model_dir}: tensor {name} has dtype {got.dtype}, {want.dtype} in {reference.model_dir}"
            )
    extra = sorted(other_names - ref_names)
    if extra:
        raise MergeError(
            f"{other.model_dir}: tensor {extra[0]} is not in {reference.model_dir} "
            f"({len(extra)} such tensors); the output keeps the reference's tensors only"
        )


def _is_float_code(code: str) -> bool:
    return code.startswith(("F", "BF"))


def _embedding_names(reference: str) -> frozenset[str]:
    """On-disk names of the input embedding and output head, read off the meta model.

    These are 2-D but not linear maps of hidden states, so WUDI-like kernels must not treat
    them as (out, in) weights.
    """
    from transformers import AutoConfig

    from moemerge.architectures.layout import build_meta_model, disk_names

    config = AutoConfig.from_pretrained(reference, trust_remote_code=False)
    model = build_meta_model(config)
    module_names = {id(m): n for n, m in model.named_modules()}
    tensors = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        prefix = module_names[id(module)]
        tensors |= {f"{prefix}.{n}": p for n, p in module.named_parameters(recurse=False)}
    return frozenset(disk_names(model, tensors).values())


def _router_copies(recipe: Recipe, reference: str, names: Sequence[str]) -> dict[str, str]:
    if recipe.routers == "merge":
        return {}
    from moemerge.architectures.layout import load_layout

    source = recipe.base_model if recipe.routers == "base" else recipe.routers
    routers = load_layout(reference).router_tensors
    missing = sorted(routers - set(names))
    if missing:
        raise MergeError(f"{reference}: router tensor {missing[0]} named by the architecture is not on disk")
    return dict.fromkeys(sorted(routers), source)


def _param_key(method_wide: dict[str, Any], per_source: list[dict[str, Any]]) -> str:
    return json.dumps([method_wide, per_source], sort_keys=True, default=repr)


def plan_merge(recipe: Recipe) -> MergePlan:
    """Check that the recipe's models can be merged and plan the tensor loop (no tensor data read)."""
    from moemerge.merge.registry import get_method

    method = get_method(recipe.merge_method)
    base = recipe.base_model
    if method.needs_base and base is None:
        raise MergeError(f"merge method {method.name!r} needs a base_model")
    # As in mergekit, a base listed among the models is the base, not a source of a task vector.
    entries = [m for m in recipe.models if not (method.needs_base and m.model == base)]
    if not entries:
        raise MergeError(f"{method.name}: the only model listed is the base; nothing to merge")
    sources = tuple(m.model for m in entries)
    reference = base or sources[0]

    readers: dict[str, CheckpointReader] = {}
    for path in dict.fromkeys([*([base] if base else []), *sources]):
        readers[path] = CheckpointReader(path)
    ref = readers[reference]
    for path, reader in readers.items():
        if path != reference:
            _check_configs(reference, ref.config, path, reader.config)
    for path, reader in readers.items():
        if path != reference:
            _check_headers(ref, reader)
    names = tuple(ref.names())
    for name in names:
        for path, reader in readers.items():
            if reader.info(name).dtype in _UNMERGEABLE_DTYPES:
                raise MergeError(
                    f"{path}: tensor {name} is stored as {reader.info(name).dtype}; "
                    "dequantise FP8 checkpoints before merging"
                )

    params: dict[str, tuple[Params, list[Params]]] = {}
    parsed: dict[str, tuple[Params, list[Params]]] = {}
    for name in names:
        method_wide = resolve_parameters(recipe.parameters, name)
        per_source = [resolve_parameters(m.parameters, name) for m in entries]
        key = _param_key(method_wide, per_source)
        if key not in parsed:
            try:
                parsed[key] = method.parse_params(method_wide, per_source)
            except ValueError as err:
                raise MergeError(f"tensor {name}: {err}") from None
        params[name] = parsed[key]

    embeddings = _embedding_names(reference)
    linear = frozenset(n for n in names if len(ref.info(n).shape) >= 2 and n not in embeddings)
    return MergePlan(
        recipe=recipe,
        method=method,
        base=base,
        sources=sources,
        reference=reference,
        names=names,
        copy_from=_router_copies(recipe, reference, names),
        linear_weights=linear,
        params=params,
        readers=readers,
    )


# ---------------------------------------------------------------------------------------------
# The tensor loop.


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def merge_tensor(plan: MergePlan, name: str, device: str = "cpu") -> torch.Tensor:
    """The output tensor of one on-disk name, in the output dtype, on the CPU."""
    from moemerge.merge.registry import TensorContext

    out_dtype = _torch_dtype(plan.recipe.output_dtype)
    if name in plan.copy_from:
        tensor = plan.readers[plan.copy_from[name]].read(name)
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor
    reference = plan.readers[plan.reference]
    if not _is_float_code(reference.info(name).dtype):
        return reference.read(name)  # integer buffers (e.g. position ids) are not weights: keep the reference's
    work = _torch_dtype(plan.recipe.work_dtype)
    base = plan.readers[plan.base].read(name).to(device=device, dtype=work) if plan.base else None
    sources = [plan.readers[s].read(name).to(device=device, dtype=work) for s in plan.sources]
    params, source_params = plan.params[name]
    ctx = TensorContext(name, seed=plan.recipe.seed, is_linear_weight=name in plan.linear_weights)
    merged = plan.method(base, sources, source_params, params, ctx)
    del base, sources
    return merged.to(device="cpu", dtype=out_dtype)


def merge_tensors(
    plan: MergePlan,
    names: Sequence[str],
    writer: CheckpointWriter,
    *,
    device: str = "cpu",
    progress: bool = True,
    release_bytes: int = RELEASE_BYTES,
) -> None:
    """Merge `names` (any subset of `plan.names`, in any order) into `writer`, one tensor at a time.

    The readers memory-map their shards, and every page a read touches stays mapped (and counted
    in the process's RSS) until the file is closed; so each reader's handles are closed after it
    has read `release_bytes`, which keeps that page cache to about K+1 times `release_bytes`.
    """
    from tqdm.auto import tqdm

    read = dict.fromkeys(plan.readers, 0)
    for name in tqdm(names, desc=f"{plan.method.name} merge", unit="tensor", disable=not progress):
        writer.add(name, merge_tensor(plan, name, device))
        for path, reader in plan.readers.items():
            read[path] += reader.info(name).nbytes
            if read[path] >= release_bytes:
                reader.close()
                read[path] = 0


# ---------------------------------------------------------------------------------------------
# The whole stage-1 merge.


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


def _recipe_text(recipe: Recipe) -> str:
    import yaml

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
) -> Path:
    """Run stage 1 of `recipe` (a Recipe or a YAML path) into `out_dir`, atomically; returns `out_dir`.

    Every check (configs, tensor names, shapes, parameters) runs before anything is written; a
    failure later removes the temporary folder, so `out_dir` is either complete or untouched.
    """
    from moemerge.checkpoint.card import model_card
    from moemerge.checkpoint.writer import CheckpointWriter

    if isinstance(recipe, str | Path):
        recipe_text = recipe_text or Path(recipe).read_text()
        recipe = load_recipe(recipe)
    recipe_text = recipe_text or _recipe_text(recipe)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir}: output exists; pass --overwrite to replace it")
    inputs = {Path(p).resolve() for p in [*recipe.source_paths, *([recipe.base_model] if recipe.base_model else [])]}
    if out_dir.resolve() in inputs:
        raise MergeError(f"{out_dir}: the output folder is one of the input models")
    shard_bytes = parse_size(max_shard_bytes)
    device = resolve_device(device)
    if recipe.merge_method == "regmean":  # needs activations: a per-tensor merge, then the calibration walk
        from moemerge.merge.regmean import merge_regmean

        settings = {"device": device, "max_shard_bytes": shard_bytes, "progress": progress}
        return merge_regmean(recipe, out_dir, overwrite=overwrite, recipe_text=recipe_text, **settings)

    plan = plan_merge(recipe)

    def finish(writer: CheckpointWriter) -> None:
        writer.copy_support_files(recipe.tokenizer_model)
        config = _output_config(plan, recipe.tokenizer_model)
        if config is not None:
            writer.write_text("config.json", config)
        card = model_card(recipe=recipe_text, sources=list(plan.sources), base=plan.base, summary=_summary(plan))
        writer.write_text("README.md", card)

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: each rank merges whole shards
            from moemerge.merge.distributed import merge_sharded

            sharded = {"overwrite": overwrite, "device": device, "max_shard_bytes": shard_bytes, "progress": progress}
            return merge_sharded(plan, out_dir, finish, **sharded)
        with CheckpointWriter(out_dir, overwrite=overwrite, max_shard_bytes=shard_bytes) as writer:
            merge_tensors(plan, plan.names, writer, device=device, progress=progress)
            finish(writer)
            return writer.finalize(expected=set(plan.names))
    finally:
        for reader in plan.readers.values():
            reader.close()
