"""Reference quantities built from their definitions in float64, shared by the HARC tests."""

from __future__ import annotations

import torch

from moemerge.calibrate.operator import blend_coefficients


def dense_curvature(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, kind: str) -> torch.Tensor:
    """(1/N) sum_x kron(H(x), x x^T) for row-major vec([W | b]), token by token from the definition.

    H(x) is the Hessian of the routing loss in the logits: diag(s(1-s)) for sigmoid routers,
    diag(p) - p p^T for softmax ones; with a bias, x is extended by a constant 1.
    """
    Xe = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1) if b is not None else X
    We = torch.cat([W, b[:, None]], dim=1) if b is not None else W
    size = We.numel()
    A = torch.zeros(size, size, dtype=torch.float64)
    for x in Xe:
        z = We @ x
        if kind == "sigmoid":
            s = torch.sigmoid(z)
            H = torch.diag(s * (1 - s))
        else:
            p = torch.softmax(z, dim=0)
            H = torch.diag(p) - torch.outer(p, p)
        A += torch.kron(H, torch.outer(x, x))
    return A / len(Xe)


def blend(A: torch.Tensor, gamma: float) -> torch.Tensor:
    """HARC's regularised operator: the dense matrix blended with its own diagonal by gamma."""
    a, c = blend_coefficients(gamma)
    return a * A + c * torch.diag(torch.diagonal(A))
