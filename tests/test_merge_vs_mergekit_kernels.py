"""Our stage-1 kernels against mergekit's own tensor-level merge code.

Deterministic methods must agree to rounding; for the random ones (DARE, DELLA) masks come
from different generators, so the statistics are compared: kept fraction, per-rank keep
probability and the rescale factor.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.registry import get as mergekit_method  # noqa: E402
from mergekit.sparsify import RescaleNorm, bernoulli, della_magprune  # noqa: E402

from moemerge.merge.registry import TensorContext, get_method  # noqa: E402

F64 = torch.float64


def case(k: int, shape=(24, 16), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=gen, dtype=F64)
    return base, [base + 0.1 * torch.randn(*shape, generator=gen, dtype=F64) for _ in range(k)]


def ours(name, base, sources, shared, per_source):
    method = get_method(name)
    p, sp = method.parse_params(shared, per_source)
    return method(base, sources, sp, p, TensorContext("model.layers.3.mlp.up_proj.weight", seed=1))


def theirs(name, base, sources, shared, per_source):
    """mergekit's method on one tensor group; per-source params become per-input lists."""
    tensors = sources if base is None else [base, *sources]
    group = TensorGroup.from_tensors(tensors, base_index=None if base is None else 0)
    params = dict(shared)
    for key in per_source[0]:
        params[key] = [p[key] for p in per_source]
    return mergekit_method(name)([group], parameters=params)[0]


WEIGHTS = [0.6, -0.3, 1.2]
DENSITIES = [0.3, 0.55, 0.8]


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    _, srcs = case(3)
    per = [{"weight": w} for w in WEIGHTS]
    shared = {"normalize": normalize}
    torch.testing.assert_close(ours("linear", None, srcs, shared, per), theirs("linear", None, srcs, shared, per))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_task_arithmetic(normalize, lam):
    base, srcs = case(3)
    per = [{"weight": w} for w in WEIGHTS]
    shared = {"normalize": normalize, "lambda": lam}
    torch.testing.assert_close(
        ours("task_arithmetic", base, srcs, shared, per), theirs("task_arithmetic", base, srcs, shared, per)
    )


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties(normalize, rescale):
    base, srcs = case(3)
    per = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES, strict=True)]
    shared = {"normalize": normalize, "rescale": rescale, "lambda": 0.9}
    torch.testing.assert_close(ours("ties", base, srcs, shared, per), theirs("ties", base, srcs, shared, per))


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("normalize", [True, False])
def test_breadcrumbs(name, gamma, normalize):
    base, srcs = case(3)
    per = [{"weight": w, "density": d, "gamma": gamma} for w, d in zip(WEIGHTS, DENSITIES, strict=True)]
    shared = {"normalize": normalize, "lambda": 1.3}
    torch.testing.assert_close(ours(name, base, srcs, shared, per), theirs(name, base, srcs, shared, per))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_at_full_density_are_deterministic_and_agree(name):
    base, srcs = case(3)
    per = [{"weight": w, "density": 1.0} for w in WEIGHTS]
    shared = {"lambda": 0.7}
    torch.testing.assert_close(ours(name, base, srcs, shared, per), theirs(name, base, srcs, shared, per))


def test_dare_statistics_match_mergekit():
    base, (src,) = case(1, shape=(400, 300))
    tau = src - base
    torch.manual_seed(0)
    mk = bernoulli(tau, density=0.25, rescale_norm=RescaleNorm.l1)
    mine = ours("dare_linear", base, [src], {}, [{"density": 0.25}]) - base
    for kept in (mk, mine):
        alive = kept != 0
        assert abs(alive.double().mean().item() - 0.25) < 0.01
        factor = (kept[alive] / tau[alive]).mean().item()
        assert abs(factor * 0.25 - 1) < 0.03
        torch.testing.assert_close(kept.abs().sum(), tau.abs().sum())


def test_della_statistics_match_mergekit():
    base, (src,) = case(1, shape=(128, 500))
    tau = src - base
    rank = tau.abs().argsort(dim=1).argsort(dim=1).double() / 499
    torch.manual_seed(0)
    mk = della_magprune(tau, density=0.4, epsilon=0.25, rescale_norm=None)
    mine = ours("della_linear", base, [src], {"rescale": False}, [{"density": 0.4, "epsilon": 0.25}]) - base
    for lo in (0.0, 0.3, 0.6, 0.9):
        sel = (rank >= lo) & (rank < lo + 0.1)
        p_mk = (mk[sel] != 0).double().mean().item()
        p_mine = (mine[sel] != 0).double().mean().item()
        assert abs(p_mk - p_mine) < 0.03, (lo, p_mk, p_mine)
    # survivors are untouched without rescale, in both
    for kept in (mk, mine):
        alive = kept != 0
        torch.testing.assert_close(kept[alive], tau[alive])
