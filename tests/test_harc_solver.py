"""solve_router / PCG against dense float64 solves of the HARC normal equations."""

import logging

import pytest
import torch
from references import blend, dense_curvature

from moemerge.calibrate.cg import conjugate_gradient
from moemerge.calibrate.operator import DomainCurvature, HarcSystem
from moemerge.calibrate.preconditioners import (
    AUTO_GROUPED_MAX_SIZE,
    GRAM_SUBSAMPLE_MIN_TOKENS_PER_DIM,
    _shift_space_inverse,
    build_preconditioner,
    choose_preconditioner,
    gram_stride,
    required_bytes,
)
from moemerge.calibrate.solve import RouterSolveOptions, solve_router

E, D, K = 6, 9, 3


PRECONDITIONERS = ["none", "diagonal", "kronecker", "grouped", "block"]
INITS = ["merged", "zero", "average"]
EXACT = dict(dtype="float64", tol=1e-11, max_iter=500)


def _problem(seed: int, *, bias: bool = False, n: tuple[int, ...] = (60, 90, 45)):
    """K domains with anisotropic activations, related source routers and a perturbed merge."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, D, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    X = [(torch.randn(k, D, generator=g, dtype=torch.float64) + 0.3) * scales @ rotation for k in n]
    base = torch.randn(E, D, generator=g, dtype=torch.float64)
    W = [base + 0.5 * torch.randn(E, D, generator=g, dtype=torch.float64) for _ in n]
    merged = sum(W) / len(W) + 0.1 * torch.randn(E, D, generator=g, dtype=torch.float64)
    if not bias:
        return X, W, merged, None, None
    b = [torch.randn(E, generator=g, dtype=torch.float64) for _ in n]
    return X, W, merged, b, sum(b) / len(b)


def _dense_system(X, W, b, kind, gamma):
    """Dense (E*dim)^2 matrix sum_i A_i^g and right-hand side sum_i A_i^g vec(W_i), float64."""
    total, rhs = 0, 0
    for i, Xi in enumerate(X):
        A = blend(dense_curvature(Xi, W[i], b[i] if b else None, kind), gamma)
        We = torch.cat([W[i], b[i][:, None]], 1) if b else W[i]
        total, rhs = total + A, rhs + A @ We.reshape(-1)
    return total, rhs


def _start(init, W, merged, b, merged_b):
    if init == "merged":
        return torch.cat([merged, merged_b[:, None]], 1) if b else merged
    if init == "zero":
        return torch.zeros(E, D + int(b is not None), dtype=torch.float64)
    avg = sum(W) / len(W)
    return torch.cat([avg, (sum(b) / len(b))[:, None]], 1) if b else avg


def _solution_matrix(sol):
    return torch.cat([sol.weight, sol.bias[:, None]], 1) if sol.bias is not None else sol.weight


def _rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.5])
def test_pcg_matches_dense_solve_for_every_init_and_preconditioner(gamma):
    X, W, merged, _, _ = _problem(10)
    A, rhs = _dense_system(X, W, None, "softmax", gamma)
    expected = torch.linalg.solve(A, rhs).reshape(E, D)
    for preconditioner in PRECONDITIONERS:
        for init in INITS:
            options = RouterSolveOptions(gamma=gamma, init=init, preconditioner=preconditioner, **EXACT)
            sol = solve_router(X, W, merged, options=options)
            assert sol.stats.converged and sol.stats.preconditioner == preconditioner
            assert _rel(sol.weight, expected) < 1e-5, (preconditioner, init)


@pytest.mark.parametrize("kind", ["sigmoid", "topk_softmax"])
def test_pcg_matches_dense_solve_other_kinds_with_bias(kind):
    X, W, merged, b, merged_b = _problem(11, bias=True)
    A, rhs = _dense_system(X, W, b, "sigmoid" if kind == "sigmoid" else "softmax", 0.9)
    expected = torch.linalg.solve(A, rhs).reshape(E, D + 1)
    for preconditioner in PRECONDITIONERS:
        options = RouterSolveOptions(preconditioner=preconditioner, **EXACT)
        sol = solve_router(X, W, merged, kind=kind, source_biases=b, merged_bias=merged_b, options=options)
        assert sol.bias is not None and sol.bias.shape == (E,)
        assert _rel(_solution_matrix(sol), expected) < 1e-5, preconditioner


def test_float32_default_meets_tolerance_on_true_residual():
    X, W, merged, _, _ = _problem(12)
    A, rhs = _dense_system(X, W, None, "softmax", 0.9)
    expected = torch.linalg.solve(A, rhs).reshape(E, D)
    for preconditioner in PRECONDITIONERS:
        sol = solve_router(
            [x.float() for x in X],
            [w.float() for w in W],
            merged.float(),
            options=RouterSolveOptions(preconditioner=preconditioner),
        )
        assert sol.weight.dtype == torch.float32
        true = (torch.linalg.norm(rhs - A @ sol.weight.double().reshape(-1)) / torch.linalg.norm(rhs)).item()
        assert sol.stats.converged and sol.stats.relative_residual <= 1e-6
        # The reported residual comes from the float32 operator, whose rounding is ~1e-7 of ||b||
        # (40 seeds x 5 preconditioners: median 2e-8, largest 1.2e-7 in both token layouts).
        assert true == pytest.approx(sol.stats.relative_residual, rel=0.05, abs=1.5e-7)
        assert _rel(sol.weight.double(), expected) < 1e-3


@pytest.mark.parametrize("bias", [False, True])
def test_gamma_one_gives_min_norm_update_whatever_the_preconditioner(bias):
    """Singular softmax system: compare with w0 + lstsq(A, b - A w0) on the range and by routing."""
    X, W, merged, b, merged_b = _problem(13, bias=bias)
    A, rhs = _dense_system(X, W, b, "softmax", 1.0)
    eigvals, eigvecs = torch.linalg.eigh(A)
    on_range = eigvals > 1e-10 * eigvals.max()
    range_basis, range_eigvals = eigvecs[:, on_range], eigvals[on_range]
    assert range_basis.shape[1] == A.shape[0] - A.shape[0] // E  # null space = one shift vector per input dim
    for init in INITS:
        w0 = _start(init, W, merged, b, merged_b).reshape(-1)
        # Minimum-norm least-squares update (pseudo-inverse from the eigendecomposition; LAPACK's
        # pivoted-QR lstsq was not reliable on this exactly singular matrix).
        update = range_basis @ ((range_basis.T @ (rhs - A @ w0)) / range_eigvals)
        assert torch.linalg.norm(A @ (w0 + update) - rhs) <= 1e-12 * torch.linalg.norm(rhs)
        reference = (w0 + update).reshape(E, -1)
        for preconditioner in PRECONDITIONERS:
            options = RouterSolveOptions(gamma=1.0, init=init, preconditioner=preconditioner, **EXACT)
            sol = solve_router(X, W, merged, source_biases=b, merged_bias=merged_b, options=options)
            got = _solution_matrix(sol)
            diff = (got - reference).reshape(-1)
            assert (torch.linalg.norm(range_basis.T @ diff) / torch.linalg.norm(update)).item() < 1e-5
            # The update is orthogonal to the null space {1 c^T}: zero mean over experts.
            assert (got - w0.reshape(E, -1)).mean(0).abs().max().item() < 1e-9
            for Xi in X:
                Xe = torch.cat([Xi, torch.ones(len(Xi), 1, dtype=Xi.dtype)], 1) if bias else Xi
                torch.testing.assert_close(
                    torch.softmax(Xe @ got.T, 1), torch.softmax(Xe @ reference.T, 1), rtol=0, atol=1e-7
                )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_block_preconditioner_is_exact_in_one_iteration(dtype):
    X, W, merged, b, merged_b = _problem(14, bias=True)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    for gamma in (0.9, 1.0, 1.5):
        sol = solve_router(
            [x.to(tdtype) for x in X],
            W,
            merged,
            kind="sigmoid",
            source_biases=b,
            merged_bias=merged_b,
            options=RouterSolveOptions(gamma=gamma, preconditioner="block", dtype=dtype),
        )
        assert sol.stats.iterations == 1 and sol.stats.converged, (gamma, sol.stats)


def test_zero_rhs_and_solved_start_take_no_iterations():
    X, W, merged, _, _ = _problem(15)
    zeros = [torch.zeros_like(w) for w in W]
    for preconditioner in PRECONDITIONERS:
        sol = solve_router(X, zeros, merged, options=RouterSolveOptions(preconditioner=preconditioner))
        assert sol.stats.iterations == 0
        torch.testing.assert_close(sol.weight, merged.float())

    A, rhs = _dense_system(X, W, None, "softmax", 0.9)
    solved = torch.linalg.solve(A, rhs).reshape(E, D)
    for preconditioner in PRECONDITIONERS:
        options = RouterSolveOptions(preconditioner=preconditioner, dtype="float64")
        sol = solve_router(X, W, solved, options=options)
        assert sol.stats.iterations == 0 and sol.stats.converged
        torch.testing.assert_close(sol.weight, solved, rtol=0, atol=0)


def test_identical_sources_return_that_router():
    X, W, _, _, _ = _problem(16)
    sol = solve_router(
        X,
        [W[0]] * K,
        torch.zeros(E, D, dtype=torch.float64),
        options=RouterSolveOptions(init="zero", **EXACT),
    )
    torch.testing.assert_close(sol.weight, W[0], rtol=1e-7, atol=1e-7)


def test_memory_budget_falls_back_and_reports(caplog):
    X, W, merged, _, _ = _problem(17)
    fits_kronecker = required_bytes("kronecker", E, D, torch.float32)
    assert fits_kronecker < required_bytes("block", E, D, torch.float32)
    assert required_bytes("kronecker", E, D, torch.float32) < required_bytes("grouped", E, D, torch.float32)
    with caplog.at_level(logging.WARNING, logger="moemerge.calibrate.preconditioners"):
        sol = solve_router(
            X,
            W,
            merged,
            options=RouterSolveOptions(preconditioner="block", memory_budget_bytes=fits_kronecker),
        )
    assert sol.stats.preconditioner == "kronecker" and sol.stats.requested_preconditioner == "block"
    assert sol.stats.converged
    assert any("'block'" in r.message and "'kronecker'" in r.message for r in caplog.records)

    fits_diagonal = required_bytes("diagonal", E, D, torch.float32)
    sol = solve_router(
        X, W, merged, options=RouterSolveOptions(preconditioner="block", memory_budget_bytes=fits_diagonal)
    )
    assert sol.stats.preconditioner == "diagonal" and sol.stats.converged
    sol = solve_router(X, W, merged, options=RouterSolveOptions(preconditioner="kronecker", memory_budget_bytes=0))
    assert sol.stats.preconditioner == "none" and sol.stats.converged


def _scaling(factor):
    return lambda partial_sum: factor * partial_sum


def test_reduce_hook_with_per_domain_factors_leaves_solution_unchanged():
    """Rank-count-like factors differing per domain cancel only if token counts go through the hook."""
    X, W, merged, _, _ = _problem(18)
    options = RouterSolveOptions(**EXACT)
    plain = solve_router(X, W, merged, options=options)
    domains = [
        DomainCurvature(Xi, Wi, dtype=torch.float64, reduce=_scaling(factor))
        for Xi, Wi, factor in zip(X, W, (2.0, 3.0, 5.0), strict=True)
    ]
    system = HarcSystem(domains, options.gamma)
    pre = build_preconditioner(system, "block", dtype=torch.float64)
    result = conjugate_gradient(system.apply, system.rhs(), merged, preconditioner=pre, tol=1e-11, dtype=torch.float64)
    assert result.converged and result.preconditioner == "block"
    torch.testing.assert_close(result.solution, plain.weight, rtol=1e-8, atol=1e-8)


def test_input_validation_names_the_problem():
    X, W, merged, b, _ = _problem(19, bias=True)
    with pytest.raises(ValueError, match="source router 1"):
        solve_router(X, [W[0], W[1][:, :-1], W[2]], merged)
    with pytest.raises(ValueError, match="merged_bias"):
        solve_router(X, W, merged, source_biases=b)
    with pytest.raises(ValueError, match="3 activation sets but 2"):
        solve_router(X, W[:2], merged)
    with pytest.raises(ValueError, match="router kind"):
        solve_router(X, W, merged, kind="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RouterSolveOptions(preconditioner="ilu")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.5])
def test_every_preconditioner_is_symmetric_positive_definite(kind, gamma):
    X, W, _, _, _ = _problem(20)
    system = HarcSystem(
        [DomainCurvature(x, w, kind=kind, dtype=torch.float64) for x, w in zip(X, W, strict=True)], gamma
    )
    eye = torch.eye(E * D, dtype=torch.float64)
    for name in PRECONDITIONERS:
        pre = build_preconditioner(system, name, dtype=torch.float64)
        M_inv = torch.stack([pre(v.reshape(E, D)).reshape(-1) for v in eye], dim=1)
        torch.testing.assert_close(M_inv, M_inv.T, rtol=1e-9, atol=1e-9 * M_inv.abs().max().item())
        assert torch.linalg.eigvalsh((M_inv + M_inv.T) / 2).min() > 0, name


def test_shift_space_correction_inverts_the_operator_on_row_shifts():
    """On V = 1 c^T the softmax part vanishes; the correction is the exact inverse of A^g there."""
    X, W, _, _, _ = _problem(21)
    system = HarcSystem([DomainCurvature(x, w, dtype=torch.float64) for x, w in zip(X, W, strict=True)], 0.9)
    g = torch.Generator().manual_seed(22)
    shift = torch.ones(E, 1, dtype=torch.float64) * torch.randn(1, D, generator=g, dtype=torch.float64)
    A_shift = system.apply(shift)
    torch.testing.assert_close(A_shift, system.coef_diagonal * system.unblended_diagonal() * shift)
    correction = _shift_space_inverse(system, torch.float64)
    torch.testing.assert_close(correction(A_shift), shift)


def test_auto_is_grouped_for_narrow_softmax_routers_and_kronecker_otherwise():
    X, W, merged, b, merged_b = _problem(23, bias=True)
    for kind, expected in (("softmax", "grouped"), ("topk_softmax", "grouped"), ("sigmoid", "kronecker")):
        options = RouterSolveOptions(**EXACT)
        sol = solve_router(X, W, merged, kind=kind, source_biases=b, merged_bias=merged_b, options=options)
        assert sol.stats.requested_preconditioner == "auto" and sol.stats.preconditioner == expected
        assert sol.stats.converged
    narrow = AUTO_GROUPED_MAX_SIZE // 64
    assert choose_preconditioner("auto", 64, narrow, torch.float32, None) == "grouped"
    assert choose_preconditioner("auto", 64, narrow, torch.float32, None, "sigmoid") == "kronecker"
    assert choose_preconditioner("auto", 64, narrow + 1, torch.float32, None) == "kronecker"
    assert required_bytes("auto", 8, 65, torch.float32, "sigmoid") == required_bytes("kronecker", 8, 65, torch.float32)
    assert required_bytes("auto", 64, 2049, torch.float32) == required_bytes("kronecker", 64, 2049, torch.float32)
    assert required_bytes("auto", 8, 65, torch.float32) == required_bytes("grouped", 8, 65, torch.float32)
    budget = required_bytes("kronecker", 8, 65, torch.float32)
    assert budget < required_bytes("grouped", 8, 65, torch.float32)
    assert choose_preconditioner("auto", 8, 65, torch.float32, budget) == "kronecker"


def test_gram_stride_follows_the_fewest_tokens_per_dimension():
    """Every second token only where every domain has enough tokens for the input dimension."""
    g = torch.Generator().manual_seed(30)
    W = torch.randn(E, D, generator=g, dtype=torch.float64)
    enough = GRAM_SUBSAMPLE_MIN_TOKENS_PER_DIM * D
    for counts, stride in (((enough, enough + 5), 2), ((enough, enough - 1), 1)):
        doms = [DomainCurvature(torch.randn(n, D, generator=g, dtype=torch.float64), W) for n in counts]
        assert gram_stride(HarcSystem(doms, 0.9)) == stride


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 3])
def test_grouped_blocks_match_their_definition(kind, bias, stride):
    """Groups = tokens by their expert of largest curvature; block_e = sum_g mean_g(h_e) sum_g x x^T, rescaled.

    With a stride the groups are formed from every stride-th token only; the diagonal stays exact.
    """
    X, W, _, b, _ = _problem(24, bias=bias)
    gamma = 0.8
    doms = [
        DomainCurvature(x, w, bi, kind=kind, dtype=torch.float64, batch_size=16)
        for x, w, bi in zip(X, W, b or [None] * K, strict=True)
    ]
    system = HarcSystem(doms, gamma)
    expected = torch.zeros(E, D + int(bias), D + int(bias), dtype=torch.float64)
    exact_diagonal = 0
    for i, Xi in enumerate(X):
        Xe = torch.cat([Xi, torch.ones(len(Xi), 1, dtype=Xi.dtype)], 1) if bias else Xi
        logits = Xe @ (torch.cat([W[i], b[i][:, None]], 1) if bias else W[i]).T
        if kind == "sigmoid":
            h = torch.sigmoid(logits) * (1 - torch.sigmoid(logits))
        else:
            p = torch.softmax(logits, 1)
            h = p * (1 - p)
        exact_diagonal = exact_diagonal + h.T @ (Xe * Xe) / len(Xe)
        sub, h = Xe[::stride], h[::stride]
        group = h.argmax(1)
        for g in group.unique().tolist():
            rows = sub[group == g]
            expected += h[group == g].mean(0)[:, None, None] * (rows.T @ rows) / len(sub)
    torch.testing.assert_close(system.unblended_diagonal(), exact_diagonal)
    scale = (exact_diagonal / torch.diagonal(expected, dim1=1, dim2=2)).sqrt()
    expected = expected * scale[:, :, None] * scale[:, None, :]
    a, c = gamma, 1 - gamma
    expected = a * expected + c * torch.diag_embed(exact_diagonal)
    got = system.grouped_blocks(stride)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # the blended block's diagonal is the exact diagonal of the blended operator
    torch.testing.assert_close(torch.diagonal(got, dim1=1, dim2=2), system.diagonal(), rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("preconditioner", ["auto", "diagonal", "kronecker", "grouped", "block"])
def test_cuda_solve_matches_dense_solve(kind, preconditioner):
    """The whole solve (statistics, preconditioner, CG) on the GPU against the float64 dense solve on the CPU."""
    X, W, merged, b, merged_b = _problem(25, bias=True)
    A, rhs = _dense_system(X, W, b, kind, 0.9)
    expected = torch.linalg.solve(A, rhs).reshape(E, D + 1)
    cuda = [x.cuda() for x in X]
    for dtype, tolerance in (("float64", 1e-8), ("float32", 1e-3)):
        options = RouterSolveOptions(
            preconditioner=preconditioner, dtype=dtype, tol=1e-11 if dtype == "float64" else 1e-6
        )
        sol = solve_router(cuda, W, merged, kind=kind, source_biases=b, merged_bias=merged_b, options=options)
        assert sol.weight.device.type == "cuda" and sol.stats.converged, sol.stats
        assert _rel(_solution_matrix(sol).cpu().double(), expected) < tolerance, (dtype, sol.stats)
