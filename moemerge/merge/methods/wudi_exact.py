"""WUDI's objective solved in closed form instead of by Adam.

Setting dL/dtau = 0 gives tau S = B with S = sum_i M_i, B = sum_i tau_i M_i and
M_i = tau_i^T tau_i / ||tau_i||^2. Writing A = [tau_i / ||tau_i||]_i stacked (K out x in) and
G = [tau_i tau_i^T / ||tau_i||]_i side by side (out x K out), S = A^T A and B = G A, so the
minimum-norm solution is tau = G (A^+)^T. The pseudo-inverse of A (an SVD of the smaller
side, min(K out, in)) handles rank deficiency without squaring A's condition number as
forming S would. Where the minimiser is not unique (K out < in), the minimum-norm one lies
in the task vectors' row space; Adam (per-entry steps) may end elsewhere with the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moemerge.merge.methods.wudi import WudiExactParams, WudiSource, other_tensor, task_vectors
from moemerge.merge.registry import MergeMethod, TensorContext


def solve_wudi(taus: Tensor, inv: Tensor) -> Tensor:
    """Minimum-norm minimiser of the WUDI objective for stacked tau_i [K, ..., out, in]."""
    k, out, inn = taus.shape[0], taus.shape[-2], taus.shape[-1]
    batch = taus.shape[1:-2]
    scale = inv.sqrt()
    a = (taus * scale).movedim(0, -3).reshape(*batch, k * out, inn)
    g = ((taus @ taus.mT) * scale).movedim(0, -2).reshape(*batch, out, k * out)
    return g @ torch.linalg.pinv(a).mT


def wudi_exact(
    base: Tensor | None,
    sources: Sequence[Tensor],
    source_params: Sequence[WudiSource],
    params: WudiExactParams,
    ctx: TensorContext,
) -> Tensor:
    assert base is not None
    if not ctx.is_linear_weight:
        return other_tensor(base, sources, params)
    taus, inv = task_vectors(base, sources, ctx)
    return base + params.lambda_ * solve_wudi(taus, inv)


METHODS = (
    MergeMethod(
        name="wudi_exact",
        kernel=wudi_exact,
        params_model=WudiExactParams,
        source_params_model=WudiSource,
        needs_base=True,
        doc="WUDI objective solved exactly: tau = G (A^+)^T, the minimum-norm solution of "
        "tau sum_i M_i = sum_i tau_i M_i; theta_0 + lambda * tau. arXiv:2503.08099",
    ),
)
