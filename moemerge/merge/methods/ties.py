"""TIES: trim each task vector to its largest magnitudes, elect a sign per entry, and
average only the agreeing entries (arXiv:2306.01708)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import Tensor

from moemerge.merge.methods.sparsify import magnitude, rescale_l1
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, WeightedSource, merge_task_vectors
from moemerge.merge.registry import MergeMethod, TensorContext


class SparseSource(WeightedSource):
    """`density`: fraction of each task vector's entries that survive sparsification."""

    density: float = Field(1.0, ge=0, le=1)


class TiesParams(TaskArithmeticParams):
    """mergekit defaults for ties: normalize on (disjoint mean), no rescale."""

    normalize: bool = True
    rescale: bool = False


def ties(
    base: Tensor | None,
    sources: Sequence[Tensor],
    source_params: Sequence[SparseSource],
    params: TiesParams,
    ctx: TensorContext,
) -> Tensor:
    assert base is not None

    def trim(i: int, tau: Tensor) -> Tensor:
        kept = magnitude(tau, source_params[i].density)
        return rescale_l1(tau, kept) if params.rescale else kept

    return merge_task_vectors(
        base,
        sources,
        [p.weight for p in source_params],
        sparsify=trim,
        consensus=True,
        normalize=params.normalize,
        lambda_=params.lambda_,
    )


METHODS = (
    MergeMethod(
        name="ties",
        kernel=ties,
        params_model=TiesParams,
        source_params_model=SparseSource,
        needs_base=True,
        doc="Top-density magnitude trim, sign election on sum_i w_i tau_i, weighted mean of "
        "agreeing entries, theta_0 + lambda * that. arXiv:2306.01708",
    ),
)
