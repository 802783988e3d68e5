"""Routing-aware RegMean of the experts: the closed form, the Grams the walk folds, the output, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_specialists

from moemerge.architectures.layout import ArchitectureError, load_layout
from moemerge.architectures.tiny import tiny_model
from moemerge.calibrate.fused_experts import FusedExperts, experts_module, routed_rows
from moemerge.calibrate.regmean_sums import RegMeanSums, augment, regmean_solve
from moemerge.calibrate.runner import SUMMARY_FILE, CalibrationOptions, Calibrator, Domain, calibrate
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.data import DataOptions, batches, load_domain

FAST = dict(data=DataOptions(max_length=40), batch_tokens=256)


def _domains(sources: list, data: list) -> list[Domain]:
    return [Domain(str(s), (str(f),)) for s, f in zip(sources, data, strict=True)]


def _fold_all(xs: list[torch.Tensor], targets: list[torch.Tensor], weights: list[torch.Tensor], alpha: float):
    """Fold every source in batches of 7 rows (streaming), float64."""
    sums = RegMeanSums.zeros(1, weights[0].shape[0], weights[0].shape[1], alpha, "cpu")
    for x, t, w in zip(xs, targets, weights, strict=True):
        for start in range(0, x.shape[0], 7):
            sums.fold(0, x[start : start + 7], t[start : start + 7], w)
    return sums


def _lstsq(xs, targets, weights, alpha):
    """argmin_W sum_i a ||X_i W^T - T_i||^2 + (1 - a) ||D_i^1/2 (W - W_i)^T||^2, by float64 least squares."""
    rows, rhs = [], []
    for x, t, w in zip(xs, targets, weights, strict=True):
        d = x.square().sum(0).sqrt()
        rows += [alpha**0.5 * x, (1 - alpha) ** 0.5 * torch.diag(d)]
        rhs += [alpha**0.5 * t, (1 - alpha) ** 0.5 * torch.diag(d) @ w.T]
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)).solution.T


@pytest.mark.parametrize("alpha", [0.9, 0.5, 1.0])
@pytest.mark.parametrize("sequential", [False, True])
def test_closed_form_equals_least_squares(alpha: float, sequential: bool) -> None:
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim = 5, 6
    weights = [torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(n, in_dim, generator=g, dtype=torch.float64) * torch.rand(in_dim) for n in (20, 9, 31)]
    # classic: targets are the sources' outputs on the same inputs; sequential: on other (source) inputs
    source_xs = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in xs] if sequential else xs
    targets = [s @ w.T for s, w in zip(source_xs, weights, strict=True)]
    sums = _fold_all(xs, targets, weights, alpha)
    solution, fell_back = sums.solve(torch.zeros(1, out_dim, in_dim))
    assert not fell_back.any()
    torch.testing.assert_close(solution[0], _lstsq(xs, targets, weights, alpha), rtol=1e-9, atol=1e-9)
    if not sequential:  # RegMean's own formula
        grams = [alpha * x.T @ x + (1 - alpha) * torch.diag((x.T @ x).diagonal()) for x in xs]
        expected = sum(w @ gr for w, gr in zip(weights, grams, strict=True)) @ torch.linalg.inv(sum(grams))
        torch.testing.assert_close(solution[0], expected, rtol=1e-9, atol=1e-9)


def test_expert_routed_by_one_source_is_that_source() -> None:
    """alpha 1, full-rank Gram: an expert only source 0 routes tokens to comes out as source 0's expert."""
    g = torch.Generator().manual_seed(1)
    experts, d, k = 3, 4, 2
    weights = [torch.randn(experts, 6, d, generator=g, dtype=torch.float64) for _ in range(2)]
    sums = RegMeanSums.zeros(experts, 6, d, 1.0, "cpu")
    for i, w in enumerate(weights):
        x = torch.randn(40, d, generator=g, dtype=torch.float64)
        index = torch.stack([torch.full((40,), 2 - i), torch.full((40,), 1)], dim=1)  # source 0: {2, 1}, 1: {1}
        assert index.shape == (40, k)
        for e in range(experts):
            rows, _ = routed_rows(index, torch.ones(40, k, dtype=torch.float64), e)
            if rows.numel():
                sums.fold(e, x[rows], x[rows] @ w[e].T, w[e])
    solution, fell_back = sums.solve(torch.zeros(experts, 6, d))
    torch.testing.assert_close(solution[2], weights[0][2], rtol=1e-10, atol=1e-10)
    assert not fell_back[1:].any() and fell_back[0]  # no token reached expert 0: the fallback keeps stage 1 (zeros)
    assert torch.equal(solution[0], torch.zeros(6, d, dtype=torch.float64))


def test_identical_sources_return_the_source() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 7, generator=g, dtype=torch.float64) * (i + 1) for i, n in enumerate((3, 12, 30))]
    sums = _fold_all(xs, [x @ w.T for x in xs], [w, w, w], 0.9)
    torch.testing.assert_close(sums.solve(torch.zeros(1, 5, 7))[0][0], w, rtol=1e-10, atol=1e-10)


def test_rank_deficient_gram_fits_the_data_and_keeps_stage1_elsewhere() -> None:
    g = torch.Generator().manual_seed(3)
    w, stage1 = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)  # 4 tokens, 6 inputs: rank 4 at alpha 1
    sums = _fold_all([x], [x @ w.T], [w], 1.0)
    solution, fell_back = sums.solve(stage1[None])
    assert fell_back.all()
    torch.testing.assert_close(x @ solution[0].T, x @ w.T, rtol=1e-3, atol=1e-4)  # ridge 1e-6 x max diag
    null = torch.linalg.svd(x).Vh[4:]  # directions no token reaches
    torch.testing.assert_close(solution[0] @ null.T, stage1 @ null.T, rtol=1e-3, atol=1e-4)
    assert regmean_solve(sums.rhs, torch.zeros_like(sums.gram), 1.0, stage1[None])[0][0].equal(stage1)


@pytest.mark.parametrize("model_type", ["olmoe", "gpt_oss"])
def test_expert_math_equals_the_experts_module(model_type: str) -> None:
    """[W | b] matrices and the module's own gating reproduce the module's forward (GPT-OSS: clamp, bias)."""
    model = tiny_model(model_type, seed=0, num_hidden_layers=1)
    _, module = experts_module(model.model.layers[0], "layer 0")
    fused = FusedExperts(module)
    x = torch.randn(9, model.config.hidden_size) * 3  # large enough for GPT-OSS's clamp to act
    for e in range(module.num_experts):
        index = torch.full((9, 1), e)
        with torch.no_grad():
            expected = module(x, index, torch.ones(9, 1))
            hidden = augment(fused.activation(augment(x, fused.bias) @ fused.gate_up()[e].T), fused.bias)
            torch.testing.assert_close(hidden @ fused.down()[e].T, expected, rtol=1e-5, atol=1e-5)
            before = {n: p.clone() for n, p in module.named_parameters()}
            fused.set("gate_up_proj", e, fused.gate_up()[e])
            fused.set("down_proj", e, fused.down()[e])
        assert all(torch.equal(before[n], p) for n, p in module.named_parameters())


def test_unsupported_experts_are_refused() -> None:
    class NoGate(torch.nn.Module):
        is_transposed, has_gate, has_post_expert_norm = False, False, False

        def __init__(self):
            super().__init__()
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 3, 4))

    layer = torch.nn.Module()
    layer.experts = NoGate()
    with pytest.raises(ArchitectureError, match="has_gate=False"):
        experts_module(layer, "layer 3")


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_routing_aware_grams_equal_full_model_hooks(model_type: str, tmp_path: Path) -> None:
    """What the walk folds equals sums built from each source's full transformers forward on its own domain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup = make_specialists(model_type, tmp_path, num_hidden_layers=2)
    options = CalibrationOptions(experts=True, regmean={"alpha": 0.8, "variant": "classic"}, **FAST)
    domains = _domains(setup["sources"], setup["data"])
    calibrator = Calibrator(str(setup["average"]), domains, options, tmp_path / "work")
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    calibrator.regmean.on_sums = lambda layer, s: seen.__setitem__(
        (layer, s["phase"]), (s["sums"].rhs.clone(), s["sums"].gram.clone(), s["tokens"].clone())
    )
    calibrator.run(progress=False)
    layout = load_layout(setup["average"])
    assert {layer for layer, _ in seen} == {info.index for info in layout.moe_layers}

    tokenizer = AutoTokenizer.from_pretrained(setup["average"])
    expected: dict[int, dict[str, torch.Tensor]] = {}
    real_tokens = 0
    for k, domain in enumerate(domains):
        model = AutoModelForCausalLM.from_pretrained(domain.source, dtype=torch.float32).eval()
        calls: dict[int, tuple] = {}
        for info in layout.moe_layers:
            _, module = experts_module(model.get_submodule(f"{layout.layers_module}.{info.index}"), "")
            module.register_forward_pre_hook(lambda m, args, i=info.index, c=calls: c.__setitem__(i, (m, *args)))
        samples, _ = load_domain(domain.source, domain.files, tokenizer, options.data)
        for batch in batches(samples, options.batch_tokens, tokenizer.pad_token_id):
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            real = batch.attention_mask.reshape(-1).bool()
            real_tokens += int(real.sum())
            for index, (module, x, top_k, _) in calls.items():
                fused = FusedExperts(module)
                x, top_k = x.reshape(-1, x.shape[-1])[real].double(), top_k.reshape(-1, top_k.shape[-1])[real]
                w_gu, w_down = fused.gate_up().detach().double(), fused.down().detach().double()
                ref = expected.get(index)
                if ref is None:
                    (num, inter2, d_in), (d_out, inter) = w_gu.shape, w_down.shape[1:]
                    ref = expected[index] = {
                        "rhs_gu": torch.zeros(num, inter2, d_in, dtype=torch.float64),
                        "gram_gu": torch.zeros(num, d_in, d_in, dtype=torch.float64),
                        "tokens": torch.zeros(len(domains), num, dtype=torch.float64),
                        "rhs_down": torch.zeros(num, d_out, inter, dtype=torch.float64),
                        "gram_down": torch.zeros(num, inter, inter, dtype=torch.float64),
                    }
                for e in range(w_gu.shape[0]):
                    rows = (top_k == e).any(1)
                    xe = augment(x[rows], fused.bias)
                    if fused.bias:  # GPT-OSS: its own clamped swiglu on interleaved gate/up
                        h = augment(module._apply_gate((xe @ w_gu[e].T).float()).double(), True)
                    else:
                        gate, up = (xe @ w_gu[e].T).chunk(2, dim=-1)
                        h = module.act_fn(gate) * up
                    ref["rhs_gu"][e] += 0.8 * (xe @ w_gu[e].T).T @ xe + 0.2 * w_gu[e] * xe.square().sum(0)
                    ref["gram_gu"][e] += xe.T @ xe
                    ref["tokens"][k, e] += rows.sum()
                    ref["rhs_down"][e] += 0.8 * (h @ w_down[e].T).T @ h + 0.2 * w_down[e] * h.square().sum(0)
                    ref["gram_down"][e] += h.T @ h
    for info in layout.moe_layers:
        ref = expected[info.index]
        got_rhs, got_gram, got_tokens = seen[(info.index, "gate_up_proj")]
        assert torch.equal(got_tokens, ref["tokens"])
        assert int(ref["tokens"].sum()) == info.top_k * real_tokens
        got_rhs_down, got_gram_down, _ = seen[(info.index, "down_proj")]
        for got, name in (
            (got_rhs, "rhs_gu"),
            (got_gram, "gram_gu"),
            (got_rhs_down, "rhs_down"),
            (got_gram_down, "gram_down"),
        ):
            want = ref[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=name)


def test_calibrated_experts_output_and_resume(tmp_path: Path) -> None:
    """Output loads; only experts and routers differ from stage 1; a partly finished work folder resumes exactly."""
    from transformers import AutoModelForCausalLM

    setup = make_specialists("olmoe", tmp_path)
    domains = _domains(setup["sources"], setup["data"])
    options = CalibrationOptions(experts=True, regmean={"min_tokens": 300}, **FAST)
    calibrator = Calibrator(str(setup["average"]), domains, options, tmp_path / "out.work")
    tokens: dict[int, torch.Tensor] = {}
    calibrator.regmean.on_sums = lambda layer, s: tokens.__setitem__(layer, s["tokens"].clone())
    calibrator.run(progress=False)
    out = calibrator.write(tmp_path / "out", overwrite=False)

    summary = json.loads((out / SUMMARY_FILE).read_text())
    experts = [layer["regmean"]["experts"] for layer in summary["layers"]]
    kept = [int((tokens[i].amax(0) < 300).sum()) for i in sorted(tokens)]
    assert [e["kept_stage1"] for e in experts] == kept and sum(kept) > 0
    assert all(e["calibrated"] + e["kept_stage1"] == 4 for e in experts) and sum(kept) < 12
    assert set(experts[0]["tokens"]) == {d.source for d in domains}

    stage1, calibrated = CheckpointReader(setup["average"]), CheckpointReader(out)
    routers = load_layout(out).router_tensors
    changed = {n for n in stage1.names() if not torch.equal(stage1.read(n), calibrated.read(n))}
    assert routers <= changed
    assert all(".mlp.experts." in n for n in changed - routers)
    changed_experts = {n.split(".mlp.experts.")[0] + "/" + n.split(".")[5] for n in changed - routers}
    assert len(changed_experts) == sum(e["calibrated"] for e in experts)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.randint(3, 90, (1, 8))).logits).all()

    # resume: layer 1's experts are finished but not its router (replayed from its group files); layer 2 was
    # killed part way: some group files written, one of them from an earlier attempt with other groups
    work = tmp_path / "out.work"
    assert sorted(p.name for p in work.glob("layer_0001.regmean.experts.*")) == [
        "layer_0001.regmean.experts.down_proj.0000.safetensors",
        "layer_0001.regmean.experts.gate_up_proj.0000.safetensors",
    ]
    for pattern in ("layer_0001.safetensors", "layer_0001.json", "layer_0002.json", "layer_0002.*safetensors"):
        for path in work.glob(pattern):
            if ".experts." not in path.name:
                path.unlink()
    stale = work / "layer_0002.regmean.experts.down_proj.0002.safetensors"
    shutil.copy(work / "layer_0002.regmean.experts.down_proj.0000.safetensors", stale)
    shutil.rmtree(out)
    again = calibrate(str(setup["average"]), domains, out, options, progress=False)
    for name in stage1.names():
        assert torch.equal(CheckpointReader(again).read(name), calibrated.read(name)), name
    assert not stale.exists()


@pytest.mark.parametrize("variant", ["classic", "sequential"])
def test_walk_with_identical_sources_keeps_the_experts(variant: str, tmp_path: Path) -> None:
    """Every source equal to the merged model: RegMean returns its experts (each variant, end to end)."""
    setup = make_specialists("qwen3_moe", tmp_path, num_sources=1, num_hidden_layers=2)
    base = setup["base"]
    domains = [Domain(str(base), (str(f),)) for f in setup["data"][:1]]
    options = CalibrationOptions(experts=True, regmean={"variant": variant, "min_tokens": 1}, **FAST)
    calibrator = Calibrator(str(base), domains, options, tmp_path / "work")
    calibrator.run(progress=False)
    for index, summary in calibrator.regmean.summaries.items():
        assert summary["experts"]["calibrated"] > 0, index
    reader = CheckpointReader(base)
    for name in calibrator.regmean.replaced:
        torch.testing.assert_close(calibrator.regmean.read(name), reader.read(name), rtol=1e-4, atol=1e-5)


def test_cli_flags_reach_the_options() -> None:
    from moemerge.cli import build_parser, model_values

    args = build_parser().parse_args(
        ["calibrate", "--merged", "m", "--source", "s", "--data", "s=f", "-o", "o", "--experts", "--alpha", "0.5"]
        + ["--variant", "sequential", "--min-tokens", "8", "--linear-layers", "all"]
    )
    options = CalibrationOptions(regmean=model_values(args, "regmean"), **model_values(args, "run"))
    assert options.experts and options.regmean.alpha == 0.5 and options.regmean.variant == "sequential"
    assert options.regmean.min_tokens == 8 and options.regmean.linear_layers == "all"


def test_recipe_section_takes_regmean_options_flat_or_nested(tmp_path: Path) -> None:
    """`calibrate: {experts: true, alpha: 0.9}` is `regmean: {alpha: 0.9}`; both at once is an error."""
    from moemerge.config import RecipeError, load_recipe

    def recipe(section: dict) -> Path:
        path = tmp_path / "recipe.yaml"
        section = {"domains": {"s": ["f.jsonl"]}, **section}
        path.write_text(json.dumps({"merge_method": "linear", "models": [{"model": "s"}], "calibrate": section}))
        return path

    flat = load_recipe(recipe({"experts": True, "alpha": 0.7, "min_tokens": 5})).calibrate
    assert flat.experts and flat.regmean.alpha == 0.7 and flat.regmean.min_tokens == 5
    nested = load_recipe(recipe({"experts": True, "regmean": {"alpha": 0.7, "min_tokens": 5}})).calibrate
    assert nested.regmean == flat.regmean
    with pytest.raises(RecipeError, match="alpha is given both"):
        load_recipe(recipe({"experts": True, "alpha": 0.7, "regmean": {"alpha": 0.5}}))
    with pytest.raises(RecipeError, match="nothing to calibrate"):
        load_recipe(recipe({"experts": False, "routers": False}))
