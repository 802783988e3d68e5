"""WUDI-Merging with Adam, as in the paper's official code (arXiv:2503.08099).

For a linear weight (last two axes (out, in)) WUDI chooses the merged task vector tau that
minimises the interference each task vector predicts for its own inputs:

    L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

starting from tau = sum_i tau_i, and returns theta_0 + lambda * tau. Defaults follow the
official code (github.com/nathanielyvo/WUDI-Merging, `wudi_main.py`): Adam, lr 1e-5, 300
steps, scaling 1. Leading axes (fused experts, [E, out, in]) are independent problems.
Other tensors (1-D, embeddings, norms, lm_head: `ctx.is_linear_weight` false) follow
`other_tensors`; `average` is fusion_bench's choice, the official ViT code keeps the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from moemerge.merge.registry import MergeMethod, Params, TensorContext


class WudiSource(Params):
    """WUDI weighs sources by their own task vectors; it has no per-source parameters."""


class WudiExactParams(Params):
    lambda_: float = Field(1.0, alias="lambda")
    other_tensors: Literal["base", "average", "task_arithmetic"] = "average"


class WudiParams(WudiExactParams):
    lr: float = Field(1e-5, gt=0)
    steps: int = Field(300, ge=0)


def other_tensor(base: Tensor, sources: Sequence[Tensor], params: WudiExactParams) -> Tensor:
    """Tensors WUDI does not optimise: keep the base, average the sources, or
    theta_0 + lambda * sum_i tau_i."""
    if params.other_tensors == "base":
        return base.clone()
    total = torch.zeros_like(base)
    for src in sources:
        total.add_(src)
    if params.other_tensors == "average":
        return total.div_(len(sources))
    return base + params.lambda_ * (total - len(sources) * base)


def task_vectors(base: Tensor, sources: Sequence[Tensor], ctx: TensorContext) -> tuple[Tensor, Tensor]:
    """Stacked tau_i [K, ..., out, in] and 1/||tau_i||_F^2 [K, ..., 1, 1], with 0 for an
    all-zero tau_i so that it contributes nothing instead of dividing by zero."""
    if base.ndim < 2:
        raise ValueError(f"{ctx.name}: marked as a linear weight but has shape {tuple(base.shape)}")
    taus = torch.stack([src - base for src in sources])
    sq = taus.square().sum(dim=(-2, -1), keepdim=True)
    inv = torch.where(sq > 0, 1 / torch.where(sq > 0, sq, 1), 0)
    return taus, inv


def interference_grad(taus: Tensor, inv: Tensor) -> Callable[[Tensor], Tensor]:
    """dL/dtau = 2 (tau S - B), S = sum_i inv_i tau_i^T tau_i, B = sum_i inv_i tau_i tau_i^T tau_i.

    Precomputing the in x in matrix S pays when in <= 2 K out; otherwise the per-source
    product (K (out x out) matrices per step) is cheaper.
    """
    k, out, inn = taus.shape[0], taus.shape[-2], taus.shape[-1]
    if inn <= 2 * k * out:
        s = sum(inv[i] * (taus[i].mT @ taus[i]) for i in range(k))
        b = sum(inv[i] * ((taus[i] @ taus[i].mT) @ taus[i]) for i in range(k))
        return lambda tau: 2 * (tau @ s - b)
    return lambda tau: 2 * (inv * (((tau - taus) @ taus.mT) @ taus)).sum(dim=0)


def adam(tau: Tensor, grad: Callable[[Tensor], Tensor], lr: float, steps: int) -> Tensor:
    """torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8, no weight decay), written out so
    that it needs no autograd and runs under inference_mode."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = torch.zeros_like(tau), torch.zeros_like(tau)
    for t in range(1, steps + 1):
        g = grad(tau)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        tau.addcdiv_(m, denom, value=-lr / (1 - b1**t))
    return tau


def wudi(
    base: Tensor | None,
    sources: Sequence[Tensor],
    source_params: Sequence[WudiSource],
    params: WudiParams,
    ctx: TensorContext,
) -> Tensor:
    assert base is not None
    if not ctx.is_linear_weight:
        return other_tensor(base, sources, params)
    taus, inv = task_vectors(base, sources, ctx)
    tau = adam(taus.sum(dim=0), interference_grad(taus, inv), params.lr, params.steps)
    return base + params.lambda_ * tau


METHODS = (
    MergeMethod(
        name="wudi",
        kernel=wudi,
        params_model=WudiParams,
        source_params_model=WudiSource,
        needs_base=True,
        doc="WUDI-Merging: Adam on sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2 from "
        "tau = sum_i tau_i, theta_0 + lambda * tau. arXiv:2503.08099",
    ),
)
