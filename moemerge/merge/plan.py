"""Stage-1 planning: every defect of a recipe's models is found from headers and configs, before any tensor is read.

`plan_merge(recipe)` opens a lazy reader per model, checks that configs and tensor headers agree,
parses each tensor's parameters with the method's own parser, and returns the `MergePlan` the
tensor loop (`merge/tensors.py`) runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moemerge.architectures.layout import build_meta_model, embedding_disk_names, load_layout
from moemerge.checkpoint.reader import CheckpointReader, is_float_code
from moemerge.merge.recipe import MergeRecipe, resolve_parameters
from moemerge.merge.registry import MergeMethod, Params, get_method

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


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the model folder and the tensor or field."""


@dataclass(frozen=True)
class MergePlan:
    """Everything the tensor loop needs, derived from headers and configs alone.

    `reference` is the model whose names, shapes and layout the output keeps. `copy_from` maps
    the names that are copied rather than merged (router tensors under `routers: base|<source>`)
    to the model they come from. `params` holds the parsed parameters of each name.
    """

    recipe: MergeRecipe
    method: MergeMethod
    base: str | None
    sources: tuple[str, ...]
    reference: str
    names: tuple[str, ...]
    copy_from: Mapping[str, str]
    linear_weights: frozenset[str]
    params: Mapping[str, tuple[Params, list[Params]]]
    readers: dict[str, CheckpointReader] = field(repr=False)


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
        if is_float_code(want.dtype) != is_float_code(got.dtype):
            raise MergeError(
                f"{other.model_dir}: tensor {name} has dtype {got.dtype}, {want.dtype} in {reference.model_dir}"
            )
    extra = sorted(other_names - ref_names)
    if extra:
        raise MergeError(
            f"{other.model_dir}: tensor {extra[0]} is not in {reference.model_dir} "
            f"({len(extra)} such tensors); the output keeps the reference's tensors only"
        )


def _embedding_names(reference: str) -> frozenset[str]:
    """On-disk names of the input embedding and output head, read off the meta model.

    These are 2-D but not linear maps of hidden states, so WUDI-like kernels must not treat
    them as (out, in) weights.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(reference, trust_remote_code=False)
    embedding, head = embedding_disk_names(build_meta_model(config))
    return embedding | head


def _router_copies(recipe: MergeRecipe, reference: str, names: Sequence[str]) -> dict[str, str]:
    if recipe.routers == "merge":
        return {}
    source = recipe.base_model if recipe.routers == "base" else recipe.routers
    routers = load_layout(reference).router_tensors
    missing = sorted(routers - set(names))
    if missing:
        raise MergeError(f"{reference}: router tensor {missing[0]} named by the architecture is not on disk")
    return dict.fromkeys(sorted(routers), source)


def _param_key(method_wide: dict[str, Any], per_source: list[dict[str, Any]]) -> str:
    return json.dumps([method_wide, per_source], sort_keys=True, default=repr)


def plan_merge(recipe: MergeRecipe) -> MergePlan:
    """Check that the recipe's models can be merged and plan the tensor loop (no tensor data read)."""
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
