"""Linear: a weighted average of the sources (model soups, arXiv:2203.05482)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moemerge.merge.methods.task_arithmetic import WeightedSource
from moemerge.merge.registry import MergeMethod, Params, TensorContext


class LinearParams(Params):
    """`normalize` divides by the sum of weights (mergekit's default: on)."""

    normalize: bool = True


def linear(
    base: Tensor | None,
    sources: Sequence[Tensor],
    source_params: Sequence[WeightedSource],
    params: LinearParams,
    ctx: TensorContext,
) -> Tensor:
    """sum_i w_i theta_i [/ sum_i w_i]; the base, if any, is not an input (list it as a source)."""
    out = torch.zeros_like(sources[0])
    for src, p in zip(sources, source_params, strict=True):
        out.add_(src, alpha=p.weight)
    if params.normalize:
        total = sum(p.weight for p in source_params)
        if total == 0:
            raise ValueError(f"linear: weights sum to zero for {ctx.name}; cannot normalize")
        out.div_(total)
    return out


METHODS = (
    MergeMethod(
        name="linear",
        kernel=linear,
        params_model=LinearParams,
        source_params_model=WeightedSource,
        needs_base=False,
        doc="sum_i w_i theta_i / sum_i w_i (plain weighted sum when normalize is false).",
        spreads_non_finite=True,
        row_separable=True,
    ),
)
