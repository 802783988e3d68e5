"""Sparsifiers for task vectors, with mergekit's definitions (`mergekit/sparsify.py`).

Each returns the sparsified tensor (same shape and dtype). The random ones take their
uniform draws from `source_uniform`, so a mask depends only on (seed, tensor name, source
index): not on the device, the work dtype, global RNG state or the order tensors are merged.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from moemerge.merge.registry import TensorContext


def source_uniform(like: Tensor, ctx: TensorContext, index: int) -> Tensor:
    """Uniform [0, 1) draws shaped like `like`, reproducible from (seed, name, index) alone.

    Drawn on the CPU in float32 because CUDA generators produce other streams than CPU ones
    and the mask must not change with the device or the work dtype.
    """
    digest = hashlib.sha256(f"{ctx.seed}:{ctx.name}:{index}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(like.shape, generator=gen, dtype=torch.float32).to(like.device)


def rescale_l1(tau: Tensor, kept: Tensor, eps: float = 1e-7) -> Tensor:
    """mergekit's `rescale`: scale survivors so the L1 norm of the task vector is unchanged.

    Not the DARE/DELLA papers' per-entry 1/p; for a random mask the common factor is about
    1/density, but it is exact in norm and deterministic given the mask.
    """
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the `max(1, int(density * n))` largest magnitudes (TIES trim)."""
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    k = max(1, int(density * tau.numel()))
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().reshape(-1).topk(k).indices] = True
    return tau * keep.reshape(tau.shape)


def magnitude_outliers(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the `int(gamma * n)` largest magnitudes, then the smallest,
    keeping `int(density * n)` entries. When density + gamma > 1 fewer outliers are dropped
    so the density is still met; density >= 1 keeps everything (gamma is then ignored)."""
    if density >= 1:
        return tau
    n = tau.numel()
    n_keep = int(density * n)
    n_bottom = max(0, n - n_keep - int(gamma * n))
    order = tau.abs().reshape(-1).argsort()
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[order[n_bottom : n_bottom + n_keep]] = True
    return tau * keep.reshape(tau.shape)


def random_drop(tau: Tensor, density: float, uniform: Tensor) -> Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return tau
    return tau * (uniform < density)


def della_magprune(tau: Tensor, density: float, epsilon: float, uniform: Tensor) -> Tensor:
    """DELLA MagPrune: keep probability rises linearly with magnitude rank, from
    density - epsilon (smallest) to density + epsilon (largest).

    Ranks run along dim 1 as in mergekit: per row of a 2-D weight, over the whole of a 1-D
    tensor, and along axis 1 of a higher-rank tensor.
    """
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"della: epsilon {epsilon} must keep density +/- epsilon inside (0, 1); density is {density}")
    mags = tau.abs() if tau.ndim >= 2 else tau.abs().reshape(1, -1)
    n = mags.shape[1]
    ranks = mags.argsort(dim=1).argsort(dim=1).to(tau.dtype)
    rank_norm = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    return tau * (uniform < probs.reshape(tau.shape))
