"""Preconditioned conjugate gradient on E x d matrices (docs/HARC.md, "Solver").

Solves A w = b for a symmetric positive (semi-)definite operator given as a function, with the
inner product <U, V> = sum(U * V) of the flattened matrices. Differences from the authors' CG, on
purpose:

- the stop test is on the true relative residual ||b - A w|| / ||b||: when the recursively
  updated residual falls below ``tol`` the true one is computed and must be below it too
  (otherwise it replaces the recursive one and CG goes on), and every ``residual_refresh``
  iterations the recursive residual is replaced by the true one to stop drift. The returned
  residual is always the true one at the returned solution;
- a start point that already meets the tolerance returns after 0 iterations, and so does b = 0
  (the start point is returned; there is nothing to fit);
- the start point's image A x0 may be passed in when the caller has it (HARC's statistics sweep
  computes it with the right-hand side), which saves the first operator application;
- singular systems (gamma = 1): with ``project`` (the orthogonal projector that removes the known
  null space, see :meth:`HarcSystem.null_space_projector`) CG runs in that projector's range:
  the preconditioned residual is projected (preconditioner Π M^{-1} Π, positive definite on the
  range), and the final update w - w0 is projected once more against rounding. So the answer is
  the solution whose difference from the start point is orthogonal to the null space, whatever
  the preconditioner.

CG vectors and dot products are in ``dtype`` (float32 by default); ``apply`` may return float64
(the HARC operator accumulates in float64) and the true residual is formed in float64.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_STALLED_CHECKS = 5


@dataclass(frozen=True)
class CGResult:
    """What CG returns.

    Attributes:
        solution: w, in the CG dtype, same shape as b.
        iterations: operator applications spent on search directions (0 if the start solved it).
        relative_residual: true ||b - A w|| / ||b|| at ``solution``; ||A w|| when b = 0.
        converged: relative_residual <= tol.
        preconditioner: name of the preconditioner used.
        seconds: wall time of the solve.
    """

    solution: Tensor
    iterations: int
    relative_residual: float
    converged: bool
    preconditioner: str
    seconds: float


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return torch.vdot(u.reshape(-1), v.reshape(-1))


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor,
    *,
    preconditioner: Callable[[Tensor], Tensor] | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    dtype: torch.dtype = torch.float32,
    residual_refresh: int = 50,
    start_image: Tensor | None = None,
) -> CGResult:
    """Preconditioned CG for ``apply(w) = b`` from ``x0``.

    Args:
        apply: the operator A (symmetric positive semi-definite), any float result dtype.
        b: right-hand side (float64 recommended: the true residual is formed in float64).
        x0: start point.
        preconditioner: M^{-1}, symmetric positive definite; None for plain CG. Its ``name``
            attribute, if any, is reported.
        project: orthogonal projector onto the complement of A's known null space (singular
            systems only); see the module docstring.
        tol: stop when the true relative residual is at most this.
        max_iter: most search directions.
        dtype: dtype of the CG vectors and dot products.
        residual_refresh: replace the recursive residual by the true one this often.
        start_image: A x0 if already known (x0 as rounded to ``dtype``); None: computed here.
    """
    start = time.perf_counter()
    name = getattr(preconditioner, "name", "none" if preconditioner is None else "custom")
    precondition = preconditioner or (lambda r: r)
    in_range = project or (lambda v: v)
    b64 = b.to(torch.float64)
    x0 = x0.to(device=b.device, dtype=dtype)
    b_norm = torch.linalg.vector_norm(b64).item()

    def result(w: Tensor, iterations: int, residual: float) -> CGResult:
        seconds = time.perf_counter() - start
        converged = residual <= tol
        log = logger.info if converged else logger.warning
        log(
            "CG (%s): %d iterations, true relative residual %.3e (tol %.1e)%s, %.2f s",
            name,
            iterations,
            residual,
            tol,
            "" if converged else " NOT converged",
            seconds,
        )
        return CGResult(w, iterations, residual, converged, name, seconds)

    def true_residual(w: Tensor, image: Tensor | None = None) -> tuple[Tensor, float]:
        r64 = b64 - (apply(w) if image is None else image).to(torch.float64)
        norm = torch.linalg.vector_norm(r64).item()
        return r64.to(dtype), norm / b_norm if b_norm > 0 else norm

    if b_norm == 0:
        logger.warning(
            "right-hand side is zero: every source router is in its curvature's null space; returning the start point"
        )
        return result(x0.clone(), 0, true_residual(x0, start_image)[1])

    w = x0.clone()
    r, relative = true_residual(w, start_image)
    if relative <= tol:
        return result(w, 0, relative)

    z = in_range(precondition(in_range(r)))
    p = z.clone()
    rz = _dot(r, z)
    best, stalled, iterations = relative, 0, 0
    while iterations < max_iter:
        q = apply(p).to(dtype)
        pq = _dot(p, q)
        if not (torch.isfinite(pq) and pq > 0 and rz > 0):
            logger.warning(
                "CG breakdown at iteration %d: p^T A p = %.3e, r^T z = %.3e", iterations, pq.item(), rz.item()
            )
            break
        alpha = rz / pq
        w += alpha * p
        r -= alpha * q
        iterations += 1
        if iterations % residual_refresh == 0:
            r, relative = true_residual(w)
        if torch.linalg.vector_norm(r).item() <= tol * b_norm:
            if project is not None:
                w = x0 + project(w - x0)
            r, relative = true_residual(w)
            if relative <= tol:
                return result(w, iterations, relative)
            # Recursive residual drifted below tol but the true one did not: go on from the true one,
            # unless the true residual has stopped improving (the dtype's rounding floor).
            stalled = stalled + 1 if relative > 0.9 * best else 0
            best = min(best, relative)
            if stalled >= _STALLED_CHECKS:
                logger.warning(
                    "true residual stalled at %.3e above tol %.1e (rounding floor of %s?)",
                    relative,
                    tol,
                    dtype,
                )
                break
        z = in_range(precondition(in_range(r)))
        rz_new = _dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new

    if project is not None:
        w = x0 + project(w - x0)
    return result(w, iterations, true_residual(w)[1])
