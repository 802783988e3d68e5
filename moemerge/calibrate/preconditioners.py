"""Symmetric positive definite preconditioners M for the HARC system (M^{-1} is what CG applies).

Five choices, from cheapest to strongest (costs in units of one operator application over all
calibration tokens, for E experts and input size d; iteration counts from benchmarks/harc_cg.py),
and ``auto``, the default: ``grouped`` for narrow softmax-kind routers
(:data:`AUTO_GROUPED_MAX_SIZE`), ``kronecker`` otherwise, sigmoid routers included (measured side
by side in docs/CALIBRATION.md, "Solver"):

- ``none``: M = I.
- ``diagonal`` (Jacobi, the authors' option): M = diag of the gamma-blended operator, exact, summed
  over domains, clamped at 1e-10 and divided by its median (the scale changes nothing in exact
  arithmetic). About 1/2 application to build, E*d numbers.
- ``kronecker``: a Kronecker-factored block preconditioner plus the shift-space correction below:
  M0 = diag(h) ⊗ C^g with h_e = mean_i (1/N_i) sum_x h_ee(x) (the diagonal of the mean expert
  curvature; for softmax the mean of p_e (1 - p_e)) and C^g the mean input Gram
  mean_i (1/N_i) sum_x x x^T blended with its diagonal at gamma (the same blend as the operator),
  plus 1e-6 * mean(diag) * I. Because A_i's diagonal blocks are (1/N_i) sum_x h_ee(x) x x^T,
  h_e C^g is their mean-field approximation (correlation between h_ee(x) and x x^T dropped). With V
  row-major (E x d), (diag(h) ⊗ C) vec(V) = vec(diag(h) V C), so M0^{-1} V = diag(1/h) V C^{-1}:
  one d x d Cholesky factor. About d / (2 E) applications to build (the Gram), d^2 numbers.
  A full E x E expert factor (mean of diag(p) - p p^T, blended) was measured too and needs several
  times more iterations: its near-null vector 1 is the shift direction, which the correction
  below handles exactly.
- ``grouped``: M0 = one d x d block per expert, built from the Grams of groups of tokens instead of
  one weighted Gram per expert: each domain's tokens are grouped by the expert of largest curvature
  h_ee(x), and B_e ~= (1/N_i) sum_g mean_{x in g} h_ee(x) sum_{x in g} x x^T, summed over domains
  (:meth:`DomainCurvature.grouped_blocks`), scaled symmetrically to the exact diagonal and blended
  at gamma like ``block``; Cholesky per expert and the shift-space correction below. Unlike
  ``kronecker``'s one pooled factor, every expert's block sees which domains and which tokens it
  serves. About one Gram to build (as ``kronecker``; both from every second token where
  :func:`gram_stride` allows) plus E d^3 / 3 for the factors and E d^2
  numbers read per application, which is what limits it to narrow routers; E*d^2 numbers. On
  the shipped OLMoE specialists (E 8, d 64) CG needs 8-9 iterations against kronecker's 12-14 and
  block's 6-7.
- ``block``: M0 = the exact per-expert d x d diagonal blocks of the blended operator
  (gamma < 1: gamma B_e + (1 - gamma) diag(B_e); gamma > 1: B_e + (gamma - 1) diag(B_e)),
  Cholesky-factorised once (with a small relative jitter where a block is not numerically
  positive definite) and applied per expert, plus the shift-space correction. For sigmoid routers
  H(x) is diagonal over experts, so the blocks are the whole operator and PCG finishes in one
  iteration. About d / 2 applications to build (2 E N d^2 flops), E*d^2 numbers.

Shift-space correction (softmax kinds, gamma != 1). On S = {1 c^T} (the same vector added to every
expert's row) A_i vanishes because H(x) 1 = 0, so there the blended operator is its diagonal term
alone and, with the orthonormal basis Q = (1 / sqrt(E)) 1 ⊗ I_d of S,

    Q^T A^g Q = (c / E) diag(sum_e D_e)        (c = 1 - gamma, or gamma - 1; D = sum_i diag(A_i))

is diagonal. Block-diagonal M0 cannot see that cancellation (each block is the full weighted
Gram), so M0^{-1} A^g is badly conditioned on S. The two-level preconditioner

    M^{-1} = M0^{-1} + Q (Q^T A^g Q)^{-1} Q^T,    i.e.  M^{-1} R = M0^{-1} R + 1 ⊗ (colsum(R) / (c colsum(D)))

is still symmetric positive definite and cuts block's iterations about 8x and kronecker's about
4x (benchmarks/harc_cg.py, E = 64, d = 1024, gamma 0.9: block 73 -> 9, kronecker 149 -> 38).
At gamma = 1 S is the exact null space, which CG projects out, and sigmoid curvature has no such
subspace, so the correction is not used there. It does not help ``diagonal`` (measured), which
stays the authors' plain Jacobi. Without the gamma blend (gamma = 1) only ``block`` converged in
the benchmark (E = 64, d = 1024: 10 iterations; none, diagonal and kronecker stopped at 1000
iterations with residuals ~6e-4).

:func:`build_preconditioner` checks the memory each needs against a budget and falls back to
the best that fits (block -> grouped -> kronecker -> diagonal -> none), logging a warning and
reporting the one used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor

from moemerge.calibrate.operator import HarcSystem

logger = logging.getLogger(__name__)

from moemerge.calibrate.options import PreconditionerName  # noqa: E402

PRECONDITIONERS: tuple[str, ...] = get_args(PreconditionerName)
FALLBACK_ORDER: tuple[PreconditionerName, ...] = ("block", "grouped", "kronecker", "diagonal", "none")
"""Strongest first; a preconditioner over the memory budget falls back to the next one that fits."""

AUTO_GROUPED_MAX_SIZE = 4096
"""``auto`` uses ``grouped`` for softmax-kind routers of at most this many parameters E x dim, else ``kronecker``.

``grouped`` reads its E dim x dim factors at every iteration and combines E group Grams per
domain into them when built; both grow like E dim^2 against an operator pass's N dim, so it pays
only for narrow routers. Measured (docs/CALIBRATION.md, "Solver"): on the shipped specialists
(E 8, d 64, gamma 0.9, both Grams from every second token) it took 0.29-0.33 of Jacobi's time
where kronecker took 0.29-0.43 (softmax). For the sigmoid family kronecker is faster on every
layer (9 rounds in one process: 0.26-0.35 against 0.31-0.40 at gamma 0.9, 0.16-0.26 against
0.18-0.34 at gamma 1; the same iterations +-1 for a cheaper set-up), as on the synthetic E 16,
d 256 sigmoid job (8 iterations either way), so sigmoid routers get kronecker at every size.
Softmax at synthetic E 16, d 256: about even; E 64, d 512: grouped twice kronecker's time (19
against 29 iterations, but set-up and per-iteration solves cost more than the 10 iterations saved).
"""

GRAM_SUBSAMPLE_MIN_TOKENS_PER_DIM = 96
"""``kronecker`` and ``grouped`` take their Grams from every second token where every domain has
at least this many tokens per input dimension (:func:`gram_stride`), from all tokens otherwise.

Their set-up is dominated by those Grams (dim / (2E) passes' worth of products each), and a
preconditioner needs the Grams' shape, not their last digits (``grouped``'s blocks are scaled to
the exact diagonal either way). On the shipped specialists (E 8, d 64, 7.4-8.2 K tokens per
domain, i.e. 116-128 per dimension; 3 families x 4 layers, gamma 0.9 and 1) every second token
gave the same iterations as all of them (+-1), every fourth one more (grouped) or up to two more
(kronecker), every eighth 2-5 more. The synthetic OLMoE job (4096 tokens per domain at d 2048)
stays at every token.
"""


DIAGONAL_FLOOR = 1e-10
KRONECKER_EPS = 1e-6
_JITTERS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


@dataclass(frozen=True)
class Preconditioner:
    """M^{-1} as a function on E x dim matrices, with the name of the construction used."""

    name: PreconditionerName
    apply_inverse: Callable[[Tensor], Tensor]

    def __call__(self, R: Tensor) -> Tensor:
        return self.apply_inverse(R)


def gram_stride(system: HarcSystem) -> int:
    """2 where every domain has >= :data:`GRAM_SUBSAMPLE_MIN_TOKENS_PER_DIM` tokens per dimension, else 1.

    Decided from the token counts summed over ranks, so every rank takes the same stride.
    """
    fewest = min(dom.num_tokens for dom in system.domains)
    return 2 if fewest >= GRAM_SUBSAMPLE_MIN_TOKENS_PER_DIM * system.dim else 1


def resolve_auto(name: PreconditionerName, num_experts: int, dim: int, kind: str = "softmax") -> PreconditionerName:
    """What ``auto`` stands for at this router size and kind (:data:`AUTO_GROUPED_MAX_SIZE`); other names unchanged."""
    if name != "auto":
        return name
    narrow = num_experts * dim <= AUTO_GROUPED_MAX_SIZE
    return "grouped" if narrow and kind != "sigmoid" else "kronecker"


def required_bytes(
    name: PreconditionerName, num_experts: int, dim: int, dtype: torch.dtype, kind: str = "softmax"
) -> int:
    """Peak bytes a preconditioner's state needs beyond the operator itself (float64 sums + factors)."""
    item = torch.empty((), dtype=dtype).element_size()
    per_number = 8 + item
    name = resolve_auto(name, num_experts, dim, kind)
    if name == "none":
        return 0
    if name == "diagonal":
        return num_experts * dim * per_number
    if name == "kronecker":  # its build holds ~5 dim x dim float64 matrices (Grams, blend, factor)
        return max((dim * dim + num_experts * num_experts) * per_number, 5 * dim * dim * 8)
    if name == "block":
        return num_experts * dim * dim * per_number
    if name == "grouped":  # the summed blocks and one domain's group Grams (float64), then blocks + factors
        return num_experts * dim * dim * max(16, per_number)
    raise ValueError(f"unknown preconditioner {name!r}; expected one of {PRECONDITIONERS}")


def choose_preconditioner(
    requested: PreconditionerName,
    num_experts: int,
    dim: int,
    dtype: torch.dtype,
    memory_budget_bytes: int | None,
    kind: str = "softmax",
) -> PreconditionerName:
    """The requested preconditioner if it fits the budget, else the best weaker one that does.

    ``auto`` is first resolved by size and router kind (:func:`resolve_auto`); the answer is never ``auto``.
    """
    if requested not in PRECONDITIONERS:
        raise ValueError(f"unknown preconditioner {requested!r}; expected one of {PRECONDITIONERS}")
    requested = resolve_auto(requested, num_experts, dim, kind)
    if memory_budget_bytes is None:
        return requested
    for name in FALLBACK_ORDER[FALLBACK_ORDER.index(requested) :]:
        if required_bytes(name, num_experts, dim, dtype, kind) <= memory_budget_bytes:
            if name != requested:
                logger.warning(
                    "preconditioner %r needs %.3g GB for E=%d, dim=%d, over the memory budget of %.3g GB; "
                    "using %r instead",
                    requested,
                    required_bytes(requested, num_experts, dim, dtype, kind) / 1e9,
                    num_experts,
                    dim,
                    memory_budget_bytes / 1e9,
                    name,
                )
            return name
    raise AssertionError("unreachable: 'none' needs no memory")


def build_preconditioner(
    system: HarcSystem,
    name: PreconditionerName,
    *,
    dtype: torch.dtype = torch.float32,
    memory_budget_bytes: int | None = None,
) -> Preconditioner:
    """Build M^{-1} for ``system``; ``dtype`` is the dtype of the CG vectors it will receive."""
    used = choose_preconditioner(name, system.num_experts, system.dim, dtype, memory_budget_bytes, system.kind)
    if used == "none":
        return Preconditioner("none", lambda R: R)
    if used == "diagonal":
        return Preconditioner("diagonal", _diagonal_inverse(system, dtype))
    if used == "kronecker":
        return Preconditioner("kronecker", _kronecker_inverse(system, dtype))
    if used == "grouped":
        blocks = system.grouped_blocks(gram_stride(system))
        return Preconditioner("grouped", _block_inverse(blocks, system, dtype))
    return Preconditioner("block", _block_inverse(system.blocks(), system, dtype))


def _diagonal_inverse(system: HarcSystem, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    diagonal = system.diagonal().clamp(min=DIAGONAL_FLOOR)
    diagonal = (diagonal / diagonal.median()).to(dtype)
    return lambda R: R / diagonal


def _cholesky_solve(L: Tensor, B: Tensor) -> Tensor:
    """(L L^T)^{-1} B by two triangular solves (batched; much faster than torch.cholesky_solve on CPU)."""
    Y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True)


def _shift_space_inverse(system: HarcSystem, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    """R -> Q (Q^T A^g Q)^{-1} Q^T R on S = {1 c^T} (module docstring), or None where it does not apply."""
    if system.kind == "sigmoid" or not system.coef_diagonal:
        return None
    column = system.unblended_diagonal().sum(dim=0)
    column = column.clamp(min=DIAGONAL_FLOOR * column.max().clamp(min=torch.finfo(torch.float64).tiny))
    inverse = (1.0 / (system.coef_diagonal * column)).to(dtype)
    return lambda R: (R.sum(dim=0) * inverse).expand_as(R)


def _with_shift_space(
    system: HarcSystem, dtype: torch.dtype, base: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    correction = _shift_space_inverse(system, dtype)
    if correction is None:
        return base
    return lambda R: base(R) + correction(R)


def _regularised_cholesky(F: Tensor) -> Tensor:
    F = F.clone()
    scale = torch.diagonal(F).mean().clamp(min=torch.finfo(torch.float64).tiny)
    F.diagonal().add_(KRONECKER_EPS * scale)
    return _cholesky_with_jitter(F[None])[0]


def _kronecker_inverse(system: HarcSystem, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    expert, gram = system.kronecker_factors(gram_stride(system))
    h = torch.diagonal(expert)
    h = h.clamp(min=DIAGONAL_FLOOR * h.max().clamp(min=torch.finfo(torch.float64).tiny)).to(dtype)
    blended = system.coef_operator * gram + system.coef_diagonal * torch.diag(torch.diagonal(gram))
    L_input = _regularised_cholesky(blended).to(dtype)

    def apply(R: Tensor) -> Tensor:  # diag(1/h) R C^{-1} = diag(1/h) R L^{-T} L^{-1}
        Y = torch.linalg.solve_triangular(L_input.mT, R / h[:, None], upper=True, left=False)
        return torch.linalg.solve_triangular(L_input, Y, upper=False, left=False)

    return _with_shift_space(system, dtype, apply)


def _cholesky_with_jitter(blocks: Tensor, scale: Tensor | None = None) -> Tensor:
    """Cholesky factors of a batch of symmetric blocks, adding relative jitter where one is not PD.

    The jitter is relative to ``scale`` (default: the mean diagonal of ``blocks``); the block
    preconditioner passes the mean diagonal over all experts, so a block that is (nearly) zero
    is not inverted at its own tiny scale.
    """
    L, info = torch.linalg.cholesky_ex(blocks)
    failed = torch.nonzero(info).flatten().tolist()
    if not failed:
        return L
    if scale is None:
        scale = torch.diagonal(blocks, dim1=1, dim2=2).mean()
    scale = scale.clamp(min=torch.finfo(blocks.dtype).tiny)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    for b in failed:
        for jitter in _JITTERS:
            Lb, info_b = torch.linalg.cholesky_ex(blocks[b] + jitter * scale * eye)
            if info_b.item() == 0:
                L[b] = Lb
                logger.info("block %d was not positive definite; added relative jitter %.0e", b, jitter)
                break
        else:
            raise ValueError(
                f"block {b} of the HARC preconditioner is not positive definite "
                f"even with relative jitter {_JITTERS[-1]}"
            )
    return L


def _block_inverse(blocks: Tensor, system: HarcSystem, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Per-expert Cholesky solves with ``blocks`` (E x dim x dim float64, consumed), plus the shift-space correction."""
    scale = torch.diagonal(blocks, dim1=1, dim2=2).mean()
    factors = torch.empty_like(blocks, dtype=dtype)
    for e in range(blocks.shape[0]):  # one expert at a time keeps the float64 peak at one extra block
        factors[e] = _cholesky_with_jitter(blocks[e : e + 1], scale)[0].to(dtype)
    del blocks

    def apply(R: Tensor) -> Tensor:
        return _cholesky_solve(factors, R.unsqueeze(-1)).squeeze(-1)

    return _with_shift_space(system, dtype, apply)
