"""DARE: drop each task-vector entry with probability 1 - density and rescale the rest,
then add them (dare_linear) or elect signs as in TIES (dare_ties) (arXiv:2311.03099)."""

from __future__ import annotations

from torch import Tensor

from moemerge.merge.methods.sparsify import random_drop, rescale_l1, source_uniform
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, sparsified_kernel
from moemerge.merge.methods.ties import SparseSource
from moemerge.merge.registry import MergeMethod, TensorContext


class DareParams(TaskArithmeticParams):
    """mergekit defaults for dare_*: no normalize, `rescale` on (L1-norm matching)."""

    rescale: bool = True


def _drop(tau: Tensor, source: SparseSource, params: DareParams, ctx: TensorContext, index: int) -> Tensor:
    if source.density >= 1:
        return tau
    kept = random_drop(tau, source.density, source_uniform(tau, ctx, index))
    return rescale_l1(tau, kept) if params.rescale else kept


METHODS = (
    MergeMethod(
        name="dare_linear",
        kernel=sparsified_kernel(_drop, consensus=False),
        params_model=DareParams,
        source_params_model=SparseSource,
        needs_base=True,
        doc="Random drop (keep prob density) + rescale, then task arithmetic. arXiv:2311.03099",
    ),
    MergeMethod(
        name="dare_ties",
        kernel=sparsified_kernel(_drop, consensus=True),
        params_model=DareParams,
        source_params_model=SparseSource,
        needs_base=True,
        doc="Random drop (keep prob density) + rescale, then TIES sign election. arXiv:2311.03099",
    ),
)
