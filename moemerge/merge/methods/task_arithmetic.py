"""Task arithmetic, and the task-vector merge shared by TIES, DARE, Breadcrumbs and DELLA.

mergekit's generalized task arithmetic, per tensor (its `merge_group`):
    tau_i  = sparsify_i(theta_i - theta_0)         (optionally L1-rescaled)
    d_i    = w_i * tau_i
    mixed  = sum_i d_i                             divisor = sum_i w_i   (|sum| < 1e-8 -> 1)
    with sign consensus (TIES): elected = +1 where sum_i d_i >= 0 else -1; only entries with
    sign(d_i) == elected count, in the sum and in the divisor (sum of w_i over them, 0 -> 1);
    zeroed entries (sign 0) never count.
    theta  = theta_0 + lambda * (mixed / divisor if normalize else mixed)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from moemerge.merge.registry import Kernel, MergeMethod, Params, TensorContext


class WeightedSource(Params):
    weight: float = 1.0


class TaskArithmeticParams(Params):
    """`normalize` divides by the sum of weights; off by default for task_arithmetic."""

    normalize: bool = False
    lambda_: float = Field(1.0, alias="lambda")


Sparsifier = Callable[[int, Tensor], Tensor]


def merge_task_vectors(
    base: Tensor,
    sources: Sequence[Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """The generalized task-arithmetic merge of one tensor (see the module docstring)."""
    w = torch.tensor(weights, dtype=base.dtype, device=base.device)
    w = w.reshape(-1, *([1] * base.ndim))
    d = base.new_empty((len(sources), *base.shape))
    for i, src in enumerate(sources):
        tau = src - base
        d[i] = sparsify(i, tau) if sparsify is not None else tau
    d.mul_(w)
    if consensus:
        elected = torch.where(d.sum(dim=0) >= 0, 1.0, -1.0).to(d.dtype)
        agree = d.sign() == elected
        mixed = (d * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = d.sum(dim=0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


Sparsify = Callable[[Tensor, Any, Any, TensorContext, int], Tensor]
"""(tau_i, source i's params, method params, tensor context, i) -> the entries of tau_i that are kept."""


def sparsified_kernel(sparsify: Sparsify, consensus: bool) -> Kernel:
    """A task-vector kernel: sparsify each tau_i, then add (consensus off) or elect signs as in TIES.

    TIES, DARE, breadcrumbs and DELLA differ only in `sparsify`; the rest is `merge_task_vectors`.
    """

    def kernel(
        base: Tensor | None,
        sources: Sequence[Tensor],
        source_params: Sequence[Any],
        params: Any,
        ctx: TensorContext,
    ) -> Tensor:
        assert base is not None
        return merge_task_vectors(
            base,
            sources,
            [p.weight for p in source_params],
            sparsify=lambda i, tau: sparsify(tau, source_params[i], params, ctx, i),
            consensus=consensus,
            normalize=params.normalize,
            lambda_=params.lambda_,
        )

    return kernel


def task_arithmetic(
    base: Tensor | None,
    sources: Sequence[Tensor],
    source_params: Sequence[WeightedSource],
    params: TaskArithmeticParams,
    ctx: TensorContext,
) -> Tensor:
    assert base is not None
    return merge_task_vectors(
        base,
        sources,
        [p.weight for p in source_params],
        sparsify=None,
        consensus=False,
        normalize=params.normalize,
        lambda_=params.lambda_,
    )


METHODS = (
    MergeMethod(
        name="task_arithmetic",
        kernel=task_arithmetic,
        params_model=TaskArithmeticParams,
        source_params_model=WeightedSource,
        needs_base=True,
        doc="theta_0 + lambda * sum_i w_i (theta_i - theta_0) [/ sum_i w_i if normalize]. arXiv:2212.04089",
        spreads_non_finite=True,
        row_separable=True,
    ),
)
