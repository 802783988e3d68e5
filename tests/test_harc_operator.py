"""The HARC operator against its definition: dense Kronecker sums and autograd Hessians of the KL."""

import pytest
import torch
from references import blend, dense_curvature

from moemerge.calibrate.operator import DomainCurvature, HarcSystem

E, D, N = 5, 7, 40


def _problem(seed: int, kind: str, bias: bool, n: int = N):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=torch.float64)
    W = torch.randn(E, D, generator=g, dtype=torch.float64)
    b = torch.randn(E, generator=g, dtype=torch.float64) if bias else None
    V = torch.randn(E, D + int(bias), generator=g, dtype=torch.float64)
    return X, W, b, V


@pytest.mark.parametrize("kind", ["softmax", "topk_softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gamma", [0.6, 1.0, 1.7])
def test_operator_matches_dense_definition(kind, bias, gamma):
    X, W, b, V = _problem(1, kind, bias)
    dense_kind = "sigmoid" if kind == "sigmoid" else "softmax"
    A = dense_curvature(X, W, b, dense_kind)
    # float64 compute and a batch size that does not divide N: exercise batching and the tail.
    dom = DomainCurvature(X, W, b, kind=kind, dtype=torch.float64, batch_size=13)
    dim = dom.dim
    torch.testing.assert_close(dom.apply(V), (A @ V.reshape(-1)).reshape(E, dim), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dom.diagonal(), torch.diagonal(A).reshape(E, dim), rtol=1e-12, atol=1e-12)
    expected_blocks = torch.stack([A[e * dim : (e + 1) * dim, e * dim : (e + 1) * dim] for e in range(E)])
    torch.testing.assert_close(dom.blocks(), expected_blocks, rtol=1e-12, atol=1e-12)

    system = HarcSystem([dom], gamma)
    Ag = blend(A, gamma)
    torch.testing.assert_close(system.apply(V), (Ag @ V.reshape(-1)).reshape(E, dim), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(system.diagonal(), torch.diagonal(Ag).reshape(E, dim), rtol=1e-12, atol=1e-12)
    blended_blocks = torch.stack([Ag[e * dim : (e + 1) * dim, e * dim : (e + 1) * dim] for e in range(E)])
    torch.testing.assert_close(system.blocks(), blended_blocks, rtol=1e-12, atol=1e-12)
    rhs = (Ag @ dom.source.reshape(-1)).reshape(E, dim)
    torch.testing.assert_close(system.rhs(), rhs, rtol=1e-12, atol=1e-12)
    # the right-hand side's term comes from the curvature sweep, not from an operator pass
    torch.testing.assert_close(dom.source_image(), dom.apply(dom.source), rtol=1e-12, atol=1e-12)
    # a start point's image comes from the same sweep, and the system's from the blend
    started = DomainCurvature(X, W, b, kind=kind, dtype=torch.float64, batch_size=13, start=V)
    torch.testing.assert_close(started.start_image(), (A @ V.reshape(-1)).reshape(E, dim), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(started.source_image(), dom.source_image(), rtol=1e-12, atol=1e-12)
    start_image = HarcSystem([started], gamma).start_image()
    torch.testing.assert_close(start_image, (Ag @ V.reshape(-1)).reshape(E, dim), rtol=1e-12, atol=1e-12)


def test_system_weights_domains_equally_and_sums_them():
    """Two domains of different sizes: sum_i A_i^g with each A_i normalised by its own N_i."""
    gamma = 0.8
    (X1, W1, _, V), (X2, W2, _, _) = _problem(2, "softmax", False, n=30), _problem(3, "softmax", False, n=90)
    A = blend(dense_curvature(X1, W1, None, "softmax"), gamma) + blend(dense_curvature(X2, W2, None, "softmax"), gamma)
    doms = [DomainCurvature(X, W, dtype=torch.float64) for X, W in ((X1, W1), (X2, W2))]
    system = HarcSystem(doms, gamma)
    torch.testing.assert_close(system.apply(V), (A @ V.reshape(-1)).reshape(E, D), rtol=1e-12, atol=1e-12)
    rhs = (
        blend(dense_curvature(X1, W1, None, "softmax"), gamma) @ W1.reshape(-1)
        + blend(dense_curvature(X2, W2, None, "softmax"), gamma) @ W2.reshape(-1)
    ).reshape(E, D)
    torch.testing.assert_close(system.rhs(), rhs, rtol=1e-12, atol=1e-12)


def test_float32_compute_with_bf16_storage_is_close():
    X, W, _, V = _problem(4, "softmax", False)
    exact = DomainCurvature(X.to(torch.bfloat16).double(), W, dtype=torch.float64).apply(V)
    dom = DomainCurvature(X.to(torch.bfloat16), W, batch_size=16)
    out = dom.apply(V)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_quadratic_form_is_second_order_taylor_term_of_kl(kind):
    """1/2 <V - W_i, A_i(V - W_i)> equals the Hessian quadratic form of the mean per-token KL at W = W_i."""
    X, Wi, _, V = _problem(5, kind, False, n=12)

    def mean_kl(Wflat):
        W = Wflat.reshape(E, D)
        if kind == "sigmoid":
            s_i, log_s, log_1ms = (
                torch.sigmoid(X @ Wi.T),
                torch.nn.functional.logsigmoid(X @ W.T),
                torch.nn.functional.logsigmoid(-(X @ W.T)),
            )
            kl = s_i * (torch.log(s_i) - log_s) + (1 - s_i) * (torch.log1p(-s_i) - log_1ms)
            return kl.sum(dim=1).mean()
        log_p_i, log_p = torch.log_softmax(X @ Wi.T, dim=1), torch.log_softmax(X @ W.T, dim=1)
        return (log_p_i.exp() * (log_p_i - log_p)).sum(dim=1).mean()

    hessian = torch.autograd.functional.hessian(mean_kl, Wi.reshape(-1).clone())
    delta = (V - Wi).reshape(-1)
    dom = DomainCurvature(X, Wi, kind=kind, dtype=torch.float64)
    quad = 0.5 * torch.dot(delta, dom.apply(V - Wi).reshape(-1))
    torch.testing.assert_close(quad, 0.5 * delta @ hessian @ delta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessian, dense_curvature(X, Wi, None, kind), rtol=1e-10, atol=1e-12)
    # And the KL itself is second order at W_i: for a small step it matches the quadratic form.
    t = 1e-3
    torch.testing.assert_close(mean_kl((Wi + t * (V - Wi)).reshape(-1)), t**2 * quad, rtol=1e-2, atol=0.0)


def test_kronecker_factors_match_definition():
    X, W, _, _ = _problem(6, "softmax", False)
    dom = DomainCurvature(X, W, dtype=torch.float64, batch_size=9)
    P = torch.softmax(X @ W.T, dim=1)
    torch.testing.assert_close(dom.expert_factor(), torch.diag(P.mean(0)) - P.T @ P / N)
    torch.testing.assert_close(dom.input_gram(), X.T @ X / N)
    sig = DomainCurvature(X, W, kind="sigmoid", dtype=torch.float64)
    S = torch.sigmoid(X @ W.T)
    torch.testing.assert_close(sig.expert_factor(), torch.diag((S * (1 - S)).mean(0)))


def test_every_token_sum_goes_through_reduce():
    """A reduce that doubles every sum is N identical ranks of 2: normalised statistics must not change.

    Any token sum (including the token count) that skipped the hook would come out 2x or 1/2x.
    """
    X, W, b, V = _problem(7, "softmax", True)
    calls = []

    def doubling(t):
        calls.append(tuple(t.shape))
        assert t.dtype == torch.float64
        return 2 * t

    plain = DomainCurvature(X, W, b, dtype=torch.float64, start=V)
    hooked = DomainCurvature(X, W, b, dtype=torch.float64, reduce=doubling, start=V)
    assert hooked.num_tokens == 2 * N
    for method in ("diagonal", "source_image", "start_image", "blocks", "expert_factor", "input_gram"):
        torch.testing.assert_close(getattr(hooked, method)(), getattr(plain, method)())
    empty = torch.zeros(E, D + 1, D + 1, dtype=torch.float64)
    torch.testing.assert_close(hooked.grouped_blocks(empty.clone()), plain.grouped_blocks(empty.clone()))
    torch.testing.assert_close(hooked.grouped_blocks(empty.clone(), 2), plain.grouped_blocks(empty.clone(), 2))
    torch.testing.assert_close(hooked.input_gram(2), plain.input_gram(2))
    torch.testing.assert_close(hooked.apply(V), plain.apply(V))
    assert len(calls) >= 6


def test_rejects_bad_shapes():
    X, W, _, _ = _problem(8, "softmax", False)
    with pytest.raises(ValueError, match="E x d"):
        DomainCurvature(X, W[:, :-1])
    with pytest.raises(ValueError, match="bias"):
        DomainCurvature(X, W, torch.zeros(E + 1))
    with pytest.raises(ValueError, match="router kind"):
        DomainCurvature(X, W, kind="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="V must be"):
        DomainCurvature(X, W).apply(torch.zeros(E, D + 1))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 3])
def test_input_gram_from_every_stride_th_token(bias, stride):
    """Batches that do not divide by the stride still pick tokens 0, s, 2s, ... of the domain."""
    X, W, b, _ = _problem(8, "softmax", bias)
    dom = DomainCurvature(X, W, b, dtype=torch.float64, batch_size=13)
    Xe = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1) if bias else X
    sub = Xe[::stride]
    torch.testing.assert_close(dom.input_gram(stride), sub.T @ sub / len(sub), rtol=1e-12, atol=1e-12)
