"""Model Breadcrumbs: drop each task vector's largest (`gamma`) and smallest entries so that
`density` remain, then add them (breadcrumbs) or elect signs (breadcrumbs_ties)
(arXiv:2312.06795)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from moemerge.merge.methods.sparsify import magnitude_outliers, rescale_l1
from moemerge.merge.methods.task_arithmetic import TaskArithmeticParams, sparsified_kernel
from moemerge.merge.methods.ties import SparseSource
from moemerge.merge.registry import MergeMethod, TensorContext


class BreadcrumbsSource(SparseSource):
    """`gamma`: fraction of entries removed as large outliers before the small ones."""

    gamma: float = Field(0.01, ge=0, le=1)


class BreadcrumbsParams(TaskArithmeticParams):
    """mergekit defaults for breadcrumbs*: no normalize, no rescale."""

    rescale: bool = False


def _crumbs(
    tau: Tensor, source: BreadcrumbsSource, params: BreadcrumbsParams, ctx: TensorContext, index: int
) -> Tensor:
    kept = magnitude_outliers(tau, source.density, source.gamma)
    return rescale_l1(tau, kept) if params.rescale else kept


METHODS = (
    MergeMethod(
        name="breadcrumbs",
        kernel=sparsified_kernel(_crumbs, consensus=False),
        params_model=BreadcrumbsParams,
        source_params_model=BreadcrumbsSource,
        needs_base=True,
        doc="Drop top-gamma and bottom magnitudes (density remains), then task arithmetic. arXiv:2312.06795",
    ),
    MergeMethod(
        name="breadcrumbs_ties",
        kernel=sparsified_kernel(_crumbs, consensus=True),
        params_model=BreadcrumbsParams,
        source_params_model=BreadcrumbsSource,
        needs_base=True,
        doc="Drop top-gamma and bottom magnitudes (density remains), then TIES sign election. arXiv:2312.06795",
    ),
)
