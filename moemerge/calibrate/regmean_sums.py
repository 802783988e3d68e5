"""RegMean's arithmetic: running float64 sums of a group of linear maps, and the closed-form solve.

RegMean (Jin et al., ICLR 2023) merges a linear map y = W x of K sources in closed form::

    W = (sum_i W_i G_i^a) (sum_i G_i^a)^-1,    G_i = X_i^T X_i,    G_i^a = a G_i + (1 - a) diag(G_i)

Every source is folded into two running float64 sums per map as it streams (:class:`RegMeanSums`), so
their memory does not grow with K; per-batch products run in the work dtype. ``fold_expert_batch``
folds one batch of one source into the sums of a group of experts (routing-aware: only the tokens the
source routes to each expert). moemerge/calibrate/experts.py drives it inside the calibration walk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moemerge.calibrate.fused_experts import ExpertWeights, routed_rows

RCOND = 1e-12
"""A blended Gram whose smallest Cholesky pivot is below RCOND x its largest diagonal entry is rank deficient."""

RIDGE = 1e-6
"""Fallback ridge, relative to the largest diagonal entry, that pulls rank-deficient maps to stage 1."""


def augment(x: Tensor, bias: bool) -> Tensor:
    """x with a constant 1 column appended when the map has a bias ([W, b] [x; 1] = W x + b)."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x


@dataclass
class RegMeanSums:
    """Running sums of a group of same-shaped linear maps (the E experts of a layer, or one linear).

    ``rhs[j] = sum_i [a T_i^T X_i + (1 - a) W_i diag(X_i^T X_i)]`` and ``gram[j] = sum_i X_i^T X_i``, float64;
    the Gram is blended with its diagonal at solve time (the blend is linear, so blending the sum equals
    summing the blends). Classic RegMean has T_i = X_i W_i^T, so rhs = sum_i W_i G_i^a.
    """

    rhs: Tensor
    gram: Tensor
    alpha: float

    @classmethod
    def zeros(cls, maps: int, out_dim: int, in_dim: int, alpha: float, device: torch.device | str) -> RegMeanSums:
        return cls(
            torch.zeros(maps, out_dim, in_dim, dtype=torch.float64, device=device),
            torch.zeros(maps, in_dim, in_dim, dtype=torch.float64, device=device),
            alpha,
        )

    @staticmethod
    def bytes_per_map(out_dim: int, in_dim: int) -> int:
        return 8 * (out_dim * in_dim + in_dim * in_dim)

    def fold(self, j: int, x: Tensor, target: Tensor, weight: Tensor) -> None:
        """Add one batch of one source to map j: inputs x (n x in), the source's outputs (n x out), its W_i."""
        self.gram[j].add_(x.T @ x)  # float32 (work dtype) product, summed in float64
        self.rhs[j].add_(target.T @ x, alpha=self.alpha)
        if self.alpha != 1.0:
            self.rhs[j].add_(weight * x.square().sum(0), alpha=1.0 - self.alpha)

    def reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum over ranks (torch.distributed): each rank folded its share of the batches."""
        self.rhs = reduce(self.rhs)
        self.gram = reduce(self.gram)

    def solve(self, fallback: Tensor) -> tuple[Tensor, Tensor]:
        return regmean_solve(self.rhs, self.gram, self.alpha, fallback)


def regmean_solve(rhs: Tensor, gram: Tensor, alpha: float, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """W = rhs (a gram + (1 - a) diag(gram))^-1 for each map, float64, by Cholesky (one map at a time,
    so the solve needs a few in x in matrices beyond the sums).

    A rank-deficient blended Gram (alpha = 1 with fewer tokens than inputs, or an input no token
    excites) is solved with a ridge towards ``fallback`` (the stage-1 weight):
    ``W (G + l I) = rhs + l W_stage1`` with ``l = RIDGE * max diag G``, so directions the data pins
    down keep their solution and directions it does not reach keep stage 1. Returns (W, mask of
    maps that needed the fallback).
    """
    weight = torch.empty_like(rhs)
    fell_back = torch.zeros(rhs.shape[0], dtype=torch.bool)
    for j in range(rhs.shape[0]):
        blended = alpha * gram[j]
        blended.diagonal().copy_(gram[j].diagonal())  # a G + (1 - a) diag(G): the diagonal stays whole
        scale = float(blended.diagonal().amax()) if blended.numel() else 0.0
        factor, info = torch.linalg.cholesky_ex(blended)
        pivot = float(factor.diagonal().square().amin()) if int(info) == 0 else 0.0
        if int(info) == 0 and pivot > RCOND * scale and math.isfinite(pivot):
            weight[j] = torch.cholesky_solve(rhs[j].T, factor).T
            continue
        fell_back[j] = True
        ridge = RIDGE * scale
        if not ridge > 0:
            weight[j] = fallback[j].double()
            continue
        blended.diagonal().add_(ridge)
        factor = torch.linalg.cholesky(blended)
        weight[j] = torch.cholesky_solve((rhs[j] + ridge * fallback[j].double().to(rhs.device)).T, factor).T
    return weight, fell_back


def fold_expert_batch(
    experts: Sequence[int],
    x: Tensor,
    index: Tensor,
    weights: Tensor,
    source: ExpertWeights,
    gate_up: RegMeanSums | None,
    down: RegMeanSums | None,
    tokens: Tensor | None,
    *,
    merged_x: Tensor | None = None,
    merged: ExpertWeights | None = None,
    routing_weight: bool = False,
) -> None:
    """Fold one batch of one source into the sums of `experts` (sums row j is experts[j]).

    x (n x d), index and weights (n x k) are the source's own expert inputs and routing for n real
    tokens. gate/up's targets are the source's gate/up outputs; down's are the source expert's outputs,
    its input the source's hidden activation (classic) or, with ``merged`` (sequential), the
    activation of the model being calibrated on ``merged_x``, its own expert inputs for the same tokens.
    ``tokens[e]`` counts the tokens routed to e.
    """
    bias = source.bias
    xm = merged_x if merged_x is not None else x
    for j, e in enumerate(experts):
        rows, r = routed_rows(index, weights, e)
        if rows.numel() == 0:
            continue
        scale = r[:, None] if routing_weight else 1.0
        gu_out = augment(x[rows], bias) @ source.gate_up[e].T  # the source's gate/up outputs
        if tokens is not None:
            tokens[e] += rows.numel()
        if gate_up is not None:
            gate_up.fold(j, augment(xm[rows], bias) * scale, gu_out * scale, source.gate_up[e])
        if down is None:
            continue
        h_source = augment(source.activation(gu_out), bias)
        out = h_source @ source.down[e].T  # the source expert's output
        if merged is None:
            h_in = h_source
        else:  # sequential: the calibrated model's own hidden activation
            h_in = augment(merged.activation(augment(xm[rows], bias) @ merged.gate_up[e].T), bias)
        down.fold(j, h_in * scale, out * scale, source.down[e])
