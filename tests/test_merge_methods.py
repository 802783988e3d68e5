"""Stage-1 merge kernels against their definitions, written out here independently in float64."""

from __future__ import annotations

import pytest
import torch

from moemerge.merge.registry import MergeMethod, TensorContext, get_method, method_names, register

F64 = torch.float64


def rand(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=dtype)


def case(k: int, shape: tuple[int, ...] = (12, 9), seed: int = 0, dtype: torch.dtype = F64):
    base = rand(*shape, seed=seed, dtype=dtype)
    return base, [base + rand(*shape, seed=seed + 1 + i, scale=0.1, dtype=dtype) for i in range(k)]


def merge(name, base, sources, params=None, per_source=None, ctx=None):
    method = get_method(name)
    p, sp = method.parse_params(params or {}, per_source or [{} for _ in sources])
    return method(base, sources, sp, p, ctx or TensorContext("model.layers.0.mlp.weight", seed=7))


# ----------------------------------------------------------------- references (definitions)


def ref_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, int(density n)) largest |tau| (no magnitude ties in random inputs)."""
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))
    threshold = tau.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(tau.abs() >= threshold, tau, 0.0)


def ref_crumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Ascending magnitude rank r kept iff n_bottom <= r < n_bottom + int(density n)."""
    if density >= 1:
        return tau
    n = tau.numel()
    keep_n = int(density * n)
    bottom = max(0, n - keep_n - int(gamma * n))
    rank = torch.empty(n, dtype=torch.long)
    rank[tau.abs().flatten().sort().indices] = torch.arange(n)
    keep = (rank >= bottom) & (rank < bottom + keep_n)
    return torch.where(keep.reshape(tau.shape), tau, 0.0)


def ref_gta(base, sources, weights, lam, normalize, consensus, sparsify=lambda t: t):
    taus = [sparsify(s - base) for s in sources]
    if not consensus:
        mixed = sum(w * t for w, t in zip(weights, taus, strict=True))
        total = sum(weights)
        return base + lam * (mixed / total if normalize and abs(total) >= 1e-8 else mixed)
    weighted = [w * t for w, t in zip(weights, taus, strict=True)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for w, d in zip(weights, weighted, strict=True):
        agree = torch.sign(d) == elected
        num += torch.where(agree, d, 0.0)
        den += torch.where(agree, w, 0.0)
    if normalize:
        num = num / torch.where(den == 0, 1.0, den)
    return base + lam * num


def wudi_loss(tau: torch.Tensor, taus: list[torch.Tensor]) -> float:
    total = 0.0
    for t in taus:
        n = float(t.square().sum())
        if n > 0:
            total += float(((tau - t) @ t.T).square().sum()) / n
    return total


# ----------------------------------------------------------------- registry and parameters


def test_registry_lists_every_method():
    assert set(method_names()) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "wudi",
        "wudi_exact",
    }


def test_registry_refuses_duplicates_and_names_unknown_methods():
    linear = get_method("linear")
    dup = MergeMethod("linear", linear.kernel, linear.params_model, linear.source_params_model, False, "")
    with pytest.raises(ValueError, match="'linear' is already registered"):
        register(dup)
    with pytest.raises(ValueError, match=r"'slerpy'.*known: .*task_arithmetic"):
        get_method("slerpy")


def test_unknown_parameters_are_named():
    ties = get_method("ties")
    with pytest.raises(ValueError, match=r"method-wide.*'ties': bogus, int8_mask"):
        ties.parse_params({"bogus": 1, "int8_mask": True}, [{}])
    with pytest.raises(ValueError, match=r"source 1 parameter\(s\) for merge method 'ties': densty"):
        ties.parse_params({}, [{}, {"densty": 0.5}])
    # task_arithmetic has nothing to sparsify: a density would be silently ignored, so refuse it
    with pytest.raises(ValueError, match="density"):
        get_method("task_arithmetic").parse_params({"density": 0.5}, [{}])
    with pytest.raises(ValueError, match="density"):
        ties.parse_params({}, [{"density": 1.5}])


def test_method_wide_source_params_are_defaults_overridden_per_source():
    p, sp = get_method("dare_ties").parse_params({"density": 0.3, "weight": 0.5, "lambda": 2.0}, [{}, {"density": 0.9}])
    assert p.lambda_ == 2.0 and p.rescale and not p.normalize
    assert [(s.weight, s.density) for s in sp] == [(0.5, 0.3), (0.5, 0.9)]


def test_call_checks_base_shape_and_dtype():
    base, srcs = case(2)
    with pytest.raises(ValueError, match="needs a base"):
        merge("ties", None, srcs)
    with pytest.raises(ValueError, match=r"source 1 has shape \(3,\)"):
        merge("linear", None, [srcs[0], torch.zeros(3, dtype=F64)])
    with pytest.raises(ValueError, match="bfloat16"):
        merge("linear", None, [s.bfloat16() for s in srcs])


# ----------------------------------------------------------------- definitions


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    _, srcs = case(3)
    w = [0.2, 0.5, 1.1]
    out = merge("linear", None, srcs, {"normalize": normalize}, [{"weight": x} for x in w])
    expected = sum(x * s for x, s in zip(w, srcs, strict=True))
    torch.testing.assert_close(out, expected / sum(w) if normalize else expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic(normalize):
    base, srcs = case(3)
    w = [0.7, -0.2, 1.3]
    out = merge("task_arithmetic", base, srcs, {"normalize": normalize, "lambda": 0.6}, [{"weight": x} for x in w])
    torch.testing.assert_close(out, ref_gta(base, srcs, w, 0.6, normalize, consensus=False))


@pytest.mark.parametrize("normalize", [True, False])
def test_ties(normalize):
    base, srcs = case(3, shape=(20, 15))
    w, dens = [0.7, 0.4, 1.3], [0.2, 0.5, 0.35]
    out = merge(
        "ties",
        base,
        srcs,
        {"normalize": normalize, "lambda": 1.4},
        [{"weight": x, "density": d} for x, d in zip(w, dens, strict=True)],
    )
    taus = iter(dens)
    expected = ref_gta(base, srcs, w, 1.4, normalize, True, lambda t: ref_trim(t, next(taus)))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("density,gamma", [(0.6, 0.1), (0.95, 0.2), (0.3, 0.0)])
def test_breadcrumbs(name, consensus, density, gamma):
    base, srcs = case(2, shape=(16, 10))
    out = merge(name, base, srcs, {"density": density, "gamma": gamma, "weight": 0.8})
    expected = ref_gta(base, srcs, [0.8, 0.8], 1.0, False, consensus, lambda t: ref_crumbs(t, density, gamma))
    torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------- properties


@pytest.mark.parametrize(
    "name,params",
    [
        ("linear", {}),
        ("task_arithmetic", {"lambda": 1 / 3}),
        ("ties", {"density": 1.0}),
        ("wudi_exact", {}),
    ],
)
def test_merging_copies_returns_the_tensor(name, params):
    base, (src,) = case(1)
    out = merge(name, base, [src] * 3, params, ctx=TensorContext("w", 0, is_linear_weight=True))
    torch.testing.assert_close(out, src, atol=1e-10, rtol=1e-10)


def test_wudi_adam_on_copies_heads_for_the_copy():
    """Adam only approaches the unique minimiser (the copy) in ill-conditioned directions;
    the loss, not every entry, is what it drives to zero."""
    base, (src,) = case(1)
    tau = src - base
    out = merge("wudi", base, [src] * 3, {"lr": 3e-3, "steps": 1000}, ctx=TensorContext("w", 0, True))
    assert wudi_loss(out - base, [tau] * 3) < 1e-3 * wudi_loss(3 * tau, [tau] * 3)
    assert (out - src).norm() < 0.1 * (2 * tau).norm()


def test_ties_with_full_density_and_aligned_signs_is_task_arithmetic():
    base = rand(10, 8, seed=1)
    step = rand(10, 8, seed=2)
    srcs = [base + step * rand(10, 8, seed=3 + i).abs() for i in range(3)]  # same sign per entry
    per = [{"weight": x} for x in (0.5, 1.0, 2.0)]
    for normalize in (True, False):
        p = {"normalize": normalize, "lambda": 0.8}
        torch.testing.assert_close(merge("ties", base, srcs, p, per), merge("task_arithmetic", base, srcs, p, per))


def test_dare_with_full_density_is_task_arithmetic():
    base, srcs = case(3)
    per = [{"weight": x} for x in (0.5, 1.0, 2.0)]
    p = {"lambda": 0.7}
    torch.testing.assert_close(merge("dare_linear", base, srcs, p, per), merge("task_arithmetic", base, srcs, p, per))
    torch.testing.assert_close(
        merge("dare_ties", base, srcs, p, per), merge("ties", base, srcs, p | {"normalize": False}, per)
    )


def dare_mask(name="layer.w", seed=7, index=0, other=None, dtype=F64, shape=(40, 30)):
    """The kept entries of source `index`: other sources get weight 0, rescale off."""
    base, srcs = case(2, shape=shape, dtype=dtype)
    if other is not None:
        srcs[1 - index] = other.to(dtype)
    per = [{"weight": 1.0 if i == index else 0.0, "density": 0.4} for i in range(2)]
    out = merge("dare_linear", base, srcs, {"rescale": False}, per, TensorContext(name, seed))
    return out != base


def test_dare_masks_depend_only_on_seed_name_and_index():
    first = dare_mask()
    assert torch.equal(first, dare_mask())
    assert torch.equal(first, dare_mask(other=rand(40, 30, seed=99)))
    assert torch.equal(first, dare_mask(dtype=torch.float32))
    assert not torch.equal(first, dare_mask(seed=8))
    assert not torch.equal(first, dare_mask(name="layer.v"))
    assert not torch.equal(first, dare_mask(index=1))


@pytest.mark.parametrize("name", ["dare_linear", "della_linear"])
def test_random_drop_keeps_density_and_rescales_survivors(name):
    base, (src,) = case(1, shape=(300, 200))
    out = merge(name, base, [src], {"density": 0.3, "epsilon": 0.1} if name == "della_linear" else {"density": 0.3})
    tau, kept = src - base, out - base
    alive = kept != 0
    assert abs(alive.double().mean().item() - 0.3) < 0.01
    factor = kept[alive] / tau[alive]
    torch.testing.assert_close(factor, torch.full_like(factor, factor[0].item()))  # one common factor
    # mergekit's rescale matches the L1 norm; for a random mask that is close to 1/density
    torch.testing.assert_close(kept.abs().sum(), tau.abs().sum())
    if name == "dare_linear":
        assert abs(factor[0].item() * 0.3 - 1) < 0.03


def test_della_keep_probability_rises_with_magnitude_rank():
    base = torch.zeros(64, 400, dtype=F64)
    src = rand(64, 400, seed=5)
    out = merge("della_linear", base, [src], {"density": 0.5, "epsilon": 0.2, "rescale": False})
    alive = (out != 0).double()
    rank = src.abs().argsort(dim=1).argsort(dim=1).double() / 399  # per row, as mergekit ranks
    for lo in (0.0, 0.45, 0.9):
        sel = (rank >= lo) & (rank < lo + 0.1)
        expected = 0.3 + 0.4 * (lo + 0.05)
        assert abs(alive[sel].mean().item() - expected) < 0.03


def test_della_refuses_epsilon_outside_density_range():
    base, srcs = case(1)
    with pytest.raises(ValueError, match="epsilon"):
        merge("della", base, srcs, {"density": 0.1, "epsilon": 0.2})


# ----------------------------------------------------------------- WUDI


def wudi_case(out=8, inn=20, k=3):
    base = rand(out, inn, seed=11)
    taus = [rand(out, inn, seed=20 + i, scale=0.05) for i in range(k)]
    return base, taus


@pytest.mark.parametrize("out,inn", [(8, 20), (20, 8)])
def test_wudi_exact_is_a_stationary_point(out, inn):
    base, taus = wudi_case(out, inn)
    tau = merge("wudi_exact", base, [base + t for t in taus], ctx=TensorContext("w", 0, True)) - base
    # gradient: sum_i (tau - tau_i) tau_i^T tau_i / ||tau_i||^2 = 0
    grad = sum((tau - t) @ t.T @ t / t.square().sum() for t in taus)
    assert grad.abs().max() < 1e-10
    assert wudi_loss(tau, taus) < wudi_loss(sum(taus), taus)


@pytest.mark.parametrize("out,inn", [(8, 20), (20, 8)])
def test_wudi_adam_approaches_the_exact_objective(out, inn):
    base, taus = wudi_case(out, inn)
    srcs = [base + t for t in taus]
    ctx = TensorContext("w", 0, True)
    exact = wudi_loss(merge("wudi_exact", base, srcs, ctx=ctx) - base, taus)
    start = wudi_loss(sum(taus), taus)
    adam = wudi_loss(merge("wudi", base, srcs, {"lr": 1e-3, "steps": 1500}, ctx=ctx) - base, taus)
    assert adam - exact < 1e-3 * (start - exact)


def test_wudi_exact_with_rank_deficient_and_zero_task_vectors_is_finite():
    base = rand(10, 6, seed=3)
    low_rank = rand(10, 1, seed=4) @ rand(1, 6, seed=5)
    taus = [low_rank, 2 * low_rank, torch.zeros(10, 6, dtype=F64), rand(10, 6, seed=6)]
    ctx = TensorContext("w", 0, True)
    out = merge("wudi_exact", base, [base + t for t in taus], ctx=ctx)
    assert torch.isfinite(out).all()
    # an all-zero task vector contributes nothing
    without = merge("wudi_exact", base, [base + t for i, t in enumerate(taus) if i != 2], ctx=ctx)
    torch.testing.assert_close(out, without)
    adam = merge("wudi", base, [base + t for t in taus], {"steps": 20}, ctx=ctx)
    assert torch.isfinite(adam).all()
    assert torch.equal(merge("wudi_exact", base, [base, base], ctx=ctx), base)


@pytest.mark.parametrize("name", ["wudi", "wudi_exact"])
def test_wudi_fused_experts_are_independent_problems(name):
    base = rand(3, 6, 10, seed=1)
    srcs = [base + rand(3, 6, 10, seed=2 + i, scale=0.1) for i in range(2)]
    ctx = TensorContext("experts.down_proj", 0, True)
    fused = merge(name, base, srcs, ctx=ctx)
    for e in range(3):
        torch.testing.assert_close(fused[e], merge(name, base[e], [s[e] for s in srcs], ctx=ctx))


@pytest.mark.parametrize("name", ["wudi", "wudi_exact"])
def test_wudi_other_tensors(name):
    base, srcs = case(3, shape=(7,))
    taus = sum(s - base for s in srcs)
    ctx = TensorContext("model.norm.weight", 0, is_linear_weight=False)
    torch.testing.assert_close(merge(name, base, srcs, {"other_tensors": "base"}, ctx=ctx), base)
    torch.testing.assert_close(merge(name, base, srcs, ctx=ctx), sum(srcs) / 3)
    out = merge(name, base, srcs, {"other_tensors": "task_arithmetic", "lambda": 0.5}, ctx=ctx)
    torch.testing.assert_close(out, base + 0.5 * taus)
    with pytest.raises(ValueError, match="linear weight"):
        merge(name, base, srcs, ctx=TensorContext("model.norm.weight", 0, is_linear_weight=True))
