"""The stage-1 merge methods by name, and the typed contract every kernel follows.

A kernel merges ONE tensor. The streaming driver owns loading, dtype and placement; the
kernel only sees tensors already in the work dtype (float32/float64) and returns the merged
tensor in that dtype. Registration is explicit: `_METHOD_MODULES` lists every method module,
imported on first lookup so that importing this module stays cheap (no torch at import).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from torch import Tensor


class Params(BaseModel):
    """Base of every parameter model: unknown names are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True)
class TensorContext:
    """What a kernel may know about the tensor besides its values.

    `name` and `seed` make random masks reproducible per tensor; `is_linear_weight` tells
    data-free methods such as WUDI that the last two axes are a (out, in) linear weight
    (embeddings, norms and lm_head are not, even when 2-D).
    """

    name: str
    seed: int = 0
    is_linear_weight: bool = False


Kernel = Callable[["Tensor | None", Sequence["Tensor"], Sequence[Any], Any, TensorContext], "Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A named kernel with its parameter models.

    `params_model` holds method-wide parameters, `source_params_model` the per-source ones.
    Calling the method checks the inputs (base presence, shapes, work dtype) and the result.
    `spreads_non_finite`: every input the kernel takes reaches every output value through
    arithmetic alone (a weighted sum: NaN * 0 is NaN), so a NaN or Inf in any of them makes the
    output non-finite; the driver then checks the output only, and the inputs only to name the
    culprit (merge/tensors.py). Methods that mask, select or sort values must leave it False.
    `row_separable`: every output row is computed from the same row of each input alone, element by
    element, so merging a tensor block of rows by block of rows gives the same bits; the driver then
    merges large tensors (a 129 K-row embedding) in blocks instead of holding K+1 float32 copies.
    Methods with a statistic over the whole tensor (a magnitude quantile, a norm, a random mask drawn
    per tensor, an optimisation) must leave it False.
    """

    name: str
    kernel: Kernel
    params_model: type[Params]
    source_params_model: type[Params]
    needs_base: bool
    doc: str
    spreads_non_finite: bool = False
    row_separable: bool = False

    def parse_params(
        self, params: Mapping[str, Any] | None = None, sources: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[Params, list[Params]]:
        """Validate configuration into (method params, per-source params).

        As in mergekit, a per-source parameter (`weight`, `density`, ...) may also be given
        method-wide; it is then the default for every source, and a per-source value wins.
        """
        params = dict(params or {})
        source_fields = _field_names(self.source_params_model)
        method_fields = _field_names(self.params_model)
        unknown = sorted(set(params) - source_fields - method_fields)
        if unknown:
            raise ValueError(_unknown_message(self.name, "method-wide", unknown, method_fields | source_fields))
        shared = {k: v for k, v in params.items() if k in source_fields}
        method_values = {k: v for k, v in params.items() if k in method_fields and k not in source_fields}
        parsed_sources = []
        for index, given in enumerate(sources):
            bad = sorted(set(given) - source_fields)
            if bad:
                raise ValueError(_unknown_message(self.name, f"source {index}", bad, source_fields))
            parsed_sources.append(
                _validate(self.source_params_model, {**shared, **given}, f"{self.name} source {index}")
            )
        return _validate(self.params_model, method_values, self.name), parsed_sources

    def __call__(
        self,
        base: Tensor | None,
        sources: Sequence[Tensor],
        source_params: Sequence[Params],
        params: Params,
        ctx: TensorContext,
    ) -> Tensor:
        import torch

        if not sources:
            raise ValueError(f"{self.name}: no source tensors for {ctx.name}")
        if len(source_params) != len(sources):
            raise ValueError(
                f"{self.name}: {len(sources)} sources but {len(source_params)} source params for {ctx.name}"
            )
        if self.needs_base and base is None:
            raise ValueError(f"{self.name} needs a base tensor; none given for {ctx.name}")
        ref = sources[0]
        for label, t in [("base", base), *((f"source {i}", s) for i, s in enumerate(sources))]:
            if t is None:
                continue
            if t.shape != ref.shape:
                raise ValueError(f"{ctx.name}: {label} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            if t.dtype not in (torch.float32, torch.float64) or t.dtype != ref.dtype:
                raise ValueError(
                    f"{ctx.name}: {label} has dtype {t.dtype}; "
                    f"kernels need one work dtype, float32 or float64 (got {ref.dtype} for source 0)"
                )
        out = self.kernel(base, sources, source_params, params, ctx)
        if out.shape != ref.shape or out.dtype != ref.dtype:
            raise RuntimeError(
                f"{self.name} returned {tuple(out.shape)}/{out.dtype} for {ctx.name}, "
                f"expected {tuple(ref.shape)}/{ref.dtype}"
            )
        return out


def _field_names(model: type[BaseModel]) -> set[str]:
    """Names a user may write: the alias where one exists (`lambda`), else the field name."""
    return {f.alias or name for name, f in model.model_fields.items()}


def _unknown_message(method: str, where: str, unknown: list[str], known: set[str]) -> str:
    msg = f"unknown {where} parameter(s) for merge method {method!r}: {', '.join(unknown)}"
    msg += f"; known: {', '.join(sorted(known)) or '(none)'}"
    if "int8_mask" in unknown:
        msg += " (int8_mask is a mergekit memory option; moemerge's masks are bool, drop it)"
    return msg


def _validate(model: type[Params], values: Mapping[str, Any], where: str) -> Params:
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ValueError(f"invalid parameters for {where}: {err}") from None


# The registry. Method modules each expose `METHODS: tuple[MergeMethod, ...]`.
_METHOD_MODULES = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "della",
    "wudi",
    "wudi_exact",
)
_METHODS: dict[str, MergeMethod] = {}
_loaded = False


def _add(method: MergeMethod) -> None:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _METHODS[method.name] = method


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    try:
        for module in _METHOD_MODULES:
            for method in importlib.import_module(f"moemerge.merge.methods.{module}").METHODS:
                _add(method)
    except BaseException:
        _METHODS.clear()
        raise
    _loaded = True


def register(method: MergeMethod) -> None:
    """Add a method by name; a duplicate name is an error, never a silent replacement."""
    _ensure_loaded()
    _add(method)


def get_method(name: str) -> MergeMethod:
    _ensure_loaded()
    try:
        return _METHODS[name]
    except KeyError:
        if name == "regmean":
            raise ValueError(
                "regmean reads calibration text, it is not a per-tensor kernel: run merge_checkpoints"
            ) from None
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    _ensure_loaded()
    return sorted(_METHODS)
