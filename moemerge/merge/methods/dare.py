"""DARE: drop each task-vector entry with probability 1 - density and rescale the rest,
then add them (dare_linear) or elect signs as in TIES (dare_ties) (arXiv:2311.03099)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from moemerge.merge.methods.sparsify import random_drop, rescale_l1, source_uniform
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, merge_task_vectors
from moemerge.merge.methods.ties import SparseSource
from moemerge.merge.registry import MergeMethod, TensorContext


class DareParams(TaskArithmeticParams):
    """mergekit defaults for dare_*: no normalize, `rescale` on (L1-norm matching)."""

    rescale: bool = True


def _dare(consensus: bool):
    def kernel(
        base: Tensor | None,
        sources: Sequence[Tensor],
        source_params: Sequence[SparseSource],
        params: DareParams,
        ctx: TensorContext,
    ) -> Tensor:
        assert base is not None

        def drop(i: int, tau: Tensor) -> Tensor:
            density = source_params[i].density
            if density >= 1:
                return tau
            kept = random_drop(tau, density, source_uniform(tau, ctx, i))
            return rescale_l1(tau, kept) if params.rescale else kept

        return merge_task_vectors(
            base,
            sources,
            [p.weight for p in source_params],
            sparsify=drop,
            consensus=consensus,
            normalize=params.normalize,
            lambda_=params.lambda_,
        )

    return kernel


METHODS = (
    MergeMethod(
        name="dare_linear",
        kernel=_dare(consensus=False),
        params_model=DareParams,
        source_params_model=SparseSource,
        needs_base=True,
        doc="Random drop (keep prob density) + rescale, then task arithmetic. arXiv:2311.03099",
    ),
    MergeMethod(
        name="dare_ties",
        kernel=_dare(consensus=True),
        params_model=DareParams,
        source_params_model=SparseSource,
        needs_base=True,
        doc="Random drop (keep prob density) + rescale, then TIES sign election. arXiv:2311.03099",
    ),
)
