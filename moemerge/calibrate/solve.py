"""HARC for one router layer: the public entry point (docs/HARC.md, "Objective for one layer").

:func:`solve_router` takes each source's calibration activations for this layer (as produced by
the layer-by-layer runner) and router parameters, and returns the router W (and bias) that
minimises sum_i (1/N_i) sum_{x in X_i} 1/2 ||(W - W_i) x||^2_{H_i(x)}, regularised by gamma, by
solving sum_i A_i^g(W) = sum_i A_i^g(W_i) with preconditioned CG. It is the reference other
implementations (GPU, distributed) are checked against.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moemerge.calibrate.cg import conjugate_gradient
from moemerge.calibrate.operator import ROUTER_KINDS, DomainCurvature, HarcSystem, Reduce, RouterKind
from moemerge.calibrate.options import RouterSolveOptions
from moemerge.calibrate.preconditioners import build_preconditioner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveStats:
    """How the solve went.

    Attributes:
        iterations: CG iterations.
        relative_residual: true ||b - A w|| / ||b|| at the returned router.
        converged: relative_residual <= tol.
        preconditioner: the preconditioner used (after any memory fallback).
        requested_preconditioner: the one asked for.
        setup_seconds: building the curvature statistics, right-hand side and preconditioner.
        cg_seconds: the CG iterations.
    """

    iterations: int
    relative_residual: float
    converged: bool
    preconditioner: str
    requested_preconditioner: str
    setup_seconds: float
    cg_seconds: float

    @property
    def seconds(self) -> float:
        return self.setup_seconds + self.cg_seconds


@dataclass(frozen=True)
class RouterSolution:
    """The calibrated router, in the work dtype (the caller casts it to the checkpoint dtype).

    Attributes:
        weight: E x d.
        bias: (E,) when the router has a bias, else None.
        stats: :class:`SolveStats`.
    """

    weight: Tensor
    bias: Tensor | None
    stats: SolveStats


def solve_router(
    activations: Sequence[Tensor],
    source_weights: Sequence[Tensor],
    merged_weight: Tensor,
    *,
    kind: RouterKind = "softmax",
    source_biases: Sequence[Tensor] | None = None,
    merged_bias: Tensor | None = None,
    options: RouterSolveOptions | None = None,
    reduce: Reduce | None = None,
) -> RouterSolution:
    """Re-fit one MoE router with HARC.

    Args:
        activations: X_i per source domain, N_i x d router inputs (what the router module receives,
            non-padding tokens only), any floating dtype (bf16 storage is fine), all on one device;
            the solve runs there.
        source_weights: W_i per source, E x d, same order as ``activations``.
        merged_weight: the stage-1 merged router, E x d (the ``merged`` start point).
        kind: router scoring: ``softmax`` (softmax over all experts, then top-k, renormalised or
            not), ``topk_softmax`` (top-k, then softmax over the k; solved with the full softmax
            curvature) or ``sigmoid`` (per-expert sigmoid; the selection bias
            ``e_score_correction_bias`` is not a router bias and must not be passed here).
        source_biases: b_i per source, shape (E,), for routers with a bias (GPT-OSS); W and b are
            then solved jointly. Give ``merged_bias`` too.
        merged_bias: the stage-1 merged router bias, (E,).
        options: :class:`RouterSolveOptions` (defaults: the authors' run settings, with the
            kronecker preconditioner added).
        reduce: hook applied to every float64 sum over tokens (e.g. an all-reduce over ranks that
            hold different tokens of the same domains); identity by default.

    Returns:
        :class:`RouterSolution` with the router in the work dtype (float32 unless options.dtype is
        float64), on the activations' device.
    """
    options = options or RouterSolveOptions()
    start = time.perf_counter()
    _check_inputs(activations, source_weights, merged_weight, kind, source_biases, merged_bias)
    dtype = torch.float64 if options.dtype == "float64" else torch.float32
    device = activations[0].device
    biases: Sequence[Tensor | None] = [None] * len(activations) if source_biases is None else source_biases

    x0 = _start_point(options.init, source_weights, merged_weight, biases, merged_bias, device)
    x0 = x0.to(dtype).to(torch.float64)  # CG works in dtype: the image below is that of the rounded point
    fold_start = options.init != "zero"  # A(0) = 0 needs no products
    domains = [
        DomainCurvature(
            X,
            W,
            b,
            kind=kind,
            dtype=dtype,
            batch_size=options.batch_size,
            reduce=reduce,
            start=x0 if fold_start else None,
        )
        for X, W, b in zip(activations, source_weights, biases, strict=True)
    ]
    system = HarcSystem(domains, options.gamma)
    rhs = system.rhs()
    start_image = system.start_image() if fold_start else torch.zeros_like(x0)
    preconditioner = build_preconditioner(
        system, options.preconditioner, dtype=dtype, memory_budget_bytes=options.memory_budget_bytes
    )
    setup_seconds = time.perf_counter() - start

    result = conjugate_gradient(
        system.apply,
        rhs,
        x0,
        preconditioner=preconditioner,
        project=system.null_space_projector(),
        tol=options.tol,
        max_iter=options.max_iter,
        dtype=dtype,
        start_image=start_image,
    )
    d = activations[0].shape[1]
    weight = result.solution[:, :d].contiguous()
    bias = result.solution[:, d].contiguous() if source_biases is not None else None
    stats = SolveStats(
        iterations=result.iterations,
        relative_residual=result.relative_residual,
        converged=result.converged,
        preconditioner=result.preconditioner,
        requested_preconditioner=options.preconditioner,
        setup_seconds=setup_seconds,
        cg_seconds=result.seconds,
    )
    return RouterSolution(weight=weight, bias=bias, stats=stats)


def _start_point(
    init: str,
    source_weights: Sequence[Tensor],
    merged_weight: Tensor,
    biases: Sequence[Tensor | None],
    merged_bias: Tensor | None,
    device: torch.device,
) -> Tensor:
    """The CG start point in float64, E x dim: the merged router, zero, or the sources' average."""

    def with_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
        weight = weight.to(device=device, dtype=torch.float64)
        if bias is None:
            return weight
        return torch.cat([weight, bias.to(device=device, dtype=torch.float64)[:, None]], dim=1)

    if init == "merged":
        return with_bias(merged_weight, merged_bias)
    sources = torch.stack([with_bias(W, b) for W, b in zip(source_weights, biases, strict=True)])
    if init == "zero":
        return torch.zeros_like(sources[0])
    return sources.mean(dim=0)


def _check_inputs(
    activations: Sequence[Tensor],
    source_weights: Sequence[Tensor],
    merged_weight: Tensor,
    kind: str,
    source_biases: Sequence[Tensor] | None,
    merged_bias: Tensor | None,
) -> None:
    if kind not in ROUTER_KINDS:
        raise ValueError(f"unknown router kind {kind!r}; expected one of {ROUTER_KINDS}")
    if not activations:
        raise ValueError("solve_router needs at least one source domain")
    if len(source_weights) != len(activations):
        raise ValueError(f"{len(activations)} activation sets but {len(source_weights)} source routers")
    if merged_weight.dim() != 2:
        raise ValueError(f"merged router weight must be E x d, got shape {tuple(merged_weight.shape)}")
    shape = tuple(merged_weight.shape)
    for i, (X, W) in enumerate(zip(activations, source_weights, strict=True)):
        if tuple(W.shape) != shape:
            raise ValueError(f"source router {i} has shape {tuple(W.shape)}, the merged router {shape}")
        if X.dim() != 2 or X.shape[1] != shape[1]:
            raise ValueError(f"activations {i} must be N x {shape[1]}, got shape {tuple(X.shape)}")
        if X.device != activations[0].device:
            raise ValueError(f"activations {i} are on {X.device}, activations 0 on {activations[0].device}")
    if (source_biases is None) != (merged_bias is None):
        raise ValueError("give both source_biases and merged_bias for a router with a bias, or neither")
    if source_biases is not None and merged_bias is not None:
        if len(source_biases) != len(activations):
            raise ValueError(f"{len(activations)} activation sets but {len(source_biases)} source biases")
        for i, b in enumerate([*source_biases, merged_bias]):
            if tuple(b.shape) != (shape[0],):
                which = "merged bias" if i == len(source_biases) else f"source bias {i}"
                raise ValueError(f"{which} must have shape ({shape[0]},), got {tuple(b.shape)}")
