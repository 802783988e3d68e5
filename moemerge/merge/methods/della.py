"""DELLA: magnitude-ranked random drop (MagPrune), then TIES sign election (della) or plain
addition (della_linear) (arXiv:2406.11617)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from moemerge.merge.methods.sparsify import della_magprune, rescale_l1, source_uniform
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, sparsified_kernel
from moemerge.merge.methods.ties import SparseSource
from moemerge.merge.registry import MergeMethod, TensorContext


class DellaSource(SparseSource):
    """`epsilon`: half-width of the keep-probability range around `density` (mergekit: 0.15)."""

    epsilon: float = Field(0.15, ge=0)


class DellaParams(TaskArithmeticParams):
    """mergekit defaults for della: normalize on, `rescale` on (L1-norm matching)."""

    normalize: bool = True
    rescale: bool = True


class DellaLinearParams(DellaParams):
    """mergekit defaults for della_linear: normalize off, `rescale` on."""

    normalize: bool = False


def _prune(tau: Tensor, source: DellaSource, params: DellaParams, ctx: TensorContext, index: int) -> Tensor:
    if source.density >= 1:
        return tau
    kept = della_magprune(tau, source.density, source.epsilon, source_uniform(tau, ctx, index))
    return rescale_l1(tau, kept) if params.rescale else kept


METHODS = (
    MergeMethod(
        name="della",
        kernel=sparsified_kernel(_prune, consensus=True),
        params_model=DellaParams,
        source_params_model=DellaSource,
        needs_base=True,
        doc="MagPrune (keep prob density -/+ epsilon by magnitude rank) + rescale, then TIES "
        "sign election. arXiv:2406.11617",
    ),
    MergeMethod(
        name="della_linear",
        kernel=sparsified_kernel(_prune, consensus=False),
        params_model=DellaLinearParams,
        source_params_model=DellaSource,
        needs_base=True,
        doc="MagPrune (keep prob density -/+ epsilon by magnitude rank) + rescale, then task "
        "arithmetic. arXiv:2406.11617",
    ),
)
