"""Model Breadcrumbs: drop each task vector's largest (`gamma`) and smallest entries so that
`density` remain, then add them (breadcrumbs) or elect signs (breadcrumbs_ties)
(arXiv:2312.06795)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import Tensor

from moemerge.merge.methods.sparsify import magnitude_outliers, rescale_l1
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, merge_task_vectors
from moemerge.merge.methods.ties import SparseSource
from moemerge.merge.registry import MergeMethod, TensorContext


class BreadcrumbsSource(SparseSource):
    """`gamma`: fraction of entries removed as large outliers before the small ones."""

    gamma: float = Field(0.01, ge=0, le=1)


class BreadcrumbsParams(TaskArithmeticParams):
    """mergekit defaults for breadcrumbs*: no normalize, no rescale."""

    rescale: bool = False


def _breadcrumbs(consensus: bool):
    def kernel(
        base: Tensor | None,
        sources: Sequence[Tensor],
        source_params: Sequence[BreadcrumbsSource],
        params: BreadcrumbsParams,
        ctx: TensorContext,
    ) -> Tensor:
        assert base is not None

        def crumbs(i: int, tau: Tensor) -> Tensor:
            p = source_params[i]
            kept = magnitude_outliers(tau, p.density, p.gamma)
            return rescale_l1(tau, kept) if params.rescale else kept

        return merge_task_vectors(
            base,
            sources,
            [p.weight for p in source_params],
            sparsify=crumbs,
            consensus=consensus,
            normalize=params.normalize,
            lambda_=params.lambda_,
        )

    return kernel


METHODS = (
    MergeMethod(
        name="breadcrumbs",
        kernel=_breadcrumbs(consensus=False),
        params_model=BreadcrumbsParams,
        source_params_model=BreadcrumbsSource,
        needs_base=True,
        doc="Drop top-gamma and bottom magnitudes (density remains), then task arithmetic. arXiv:2312.06795",
    ),
    MergeMethod(
        name="breadcrumbs_ties",
        kernel=_breadcrumbs(consensus=True),
        params_model=BreadcrumbsParams,
        source_params_model=BreadcrumbsSource,
        needs_base=True,
        doc="Drop top-gamma and bottom magnitudes (density remains), then TIES sign election. arXiv:2312.06795",
    ),
)
