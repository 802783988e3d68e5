"""TIES: trim each task vector to its largest magnitudes, elect a sign per entry, and
average only the agreeing entries (arXiv:2306.01708)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from moemerge.merge.methods.sparsify import magnitude, rescale_l1
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, WeightedSource, sparsified_kernel
from moemerge.merge.registry import MergeMethod, TensorContext


class SparseSource(WeightedSource):
    """`density`: fraction of each task vector's entries that survive sparsification."""

    density: float = Field(1.0, ge=0, le=1)


class TiesParams(TaskArithmeticParams):
    """mergekit defaults for ties: normalize on (disjoint mean), no rescale."""

    normalize: bool = True
    rescale: bool = False


def _trim(tau: Tensor, source: SparseSource, params: TiesParams, ctx: TensorContext, index: int) -> Tensor:
    kept = magnitude(tau, source.density)
    return rescale_l1(tau, kept) if params.rescale else kept


METHODS = (
    MergeMethod(
        name="ties",
        kernel=sparsified_kernel(_trim, consensus=True),
        params_model=TiesParams,
        source_params_model=SparseSource,
        needs_base=True,
        doc="Top-density magnitude trim, sign election on sum_i w_i tau_i, weighted mean of "
        "agreeing entries, theta_0 + lambda * that. arXiv:2306.01708",
    ),
)
