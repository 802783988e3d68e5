"""Sequential routing-aware RegMean, end to end, against its definition in docs/EXPERTS.md.

For expert e of MoE layer l the walk should have solved, per projection,

    min_W sum_i a ||X_m,i W^T - X_s,i W_i^T||^2 + (1 - a) ||(W - W_i) diag(X_m,i^T X_m,i)^1/2||^2

over the real tokens source i routes to e in its own forward on its own domain (top-k membership),
X_m,i the calibrated model's expert inputs for those tokens, X_s,i source i's. gate/up reads x; down
reads the calibrated model's hidden activation act(gate x_m) * up x_m with this layer's solved
gate/up, and its target is source i's expert output on its own inputs.

The reference here uses none of moemerge's RegMean code: plain transformers forwards of the output
and of each source with forward pre-hooks on the experts modules, and a float64 least-squares solve
of the stacked rows. Every layer below l of the output equals the walk's model when layer l was
solved (float32 checkpoints: "as saved" is exact), and layer l's expert inputs do not depend on
layer l's experts or router, so the output's own forward gives X_m for every layer at once.

To show that the check can tell, each documented choice is also swapped for its nearest alternative
(the sources' own inputs, i.e. classic; inputs of the uncalibrated stage-1 model; down's input from
the stage-1 gate/up; the diagonal term from the sources' inputs; padding counted) and that reference
must differ from the output by well over the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_specialists

from moemerge.architectures.layout import load_layout
from moemerge.calibrate.options import RegMeanOptions
from moemerge.calibrate.runner import SUMMARY_FILE, CalibrationOptions, Domain, calibrate
from moemerge.data import DataOptions, batches, load_domain

ALPHA = 0.5
"""Below the 0.9 default so that the diagonal term weighs enough for its definition to be checked."""

TOLERANCE = 1e-5
"""Relative Frobenius error allowed between the walk's experts and the reference.

The walk folds float32 products (work_dtype) into float64 sums, solves in float64 and stores float32;
its layer-by-layer float32 forward is not bit-identical to transformers' full one, from whose float32
activations the reference starts. Seen: at most 5e-7 (2e-6 at alpha 0.9, whose Grams are worse
conditioned). Every alternative choice listed above moves the solution by at least 8e-4 here."""


def _expert_calls(model_dir: Path, layers: list[str], domain_batches: list) -> dict[str, tuple]:
    """Per experts module: (input x, top-k index, real-token mask) of every position of the batches, and the module.

    x is float64, concatenated over batches in order, padding included (the mask says which rows are
    real); read by a forward pre-hook on the experts module (``hidden_states, top_k_index,
    top_k_weights``), so the routing is the model's own.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, list] = {name: [] for name in layers}
    for name in layers:
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, s=seen[name]: s.append(args[:2]))
    with torch.no_grad():
        for batch in domain_batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    real = torch.cat([batch.attention_mask.reshape(-1).bool() for batch in domain_batches])
    calls = {}
    for name in layers:
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in seen[name]]).double()
        index = torch.cat([index.reshape(-1, index.shape[-1]) for _, index in seen[name]])
        calls[name] = (x, index, real, model.get_submodule(name))
    return calls


def _least_squares(problems: list[tuple], alpha: float) -> torch.Tensor:
    """argmin_W sum_i a ||X_i W^T - T_i||^2 + (1 - a) ||(W - W_i) diag(D_i^T D_i)^1/2||^2, float64 lstsq.

    problems: (X_i inputs n_i x in, T_i targets n_i x out, W_i out x in, D_i the inputs of the diagonal
    term, X_i in RegMean) per source; a source with no rows adds nothing.
    """
    rows, rhs = [], []
    for x, target, weight, diag_x in problems:
        if x.shape[0] == 0:
            continue
        root = torch.diag(diag_x.square().sum(0).sqrt())
        rows += [alpha**0.5 * x, (1 - alpha) ** 0.5 * root]
        rhs += [alpha**0.5 * target, (1 - alpha) ** 0.5 * root @ weight.T]
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)).solution.T


def _glu(module: torch.nn.Module, x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate x) * up x with concatenated [gate; up] (the layout of every bias-free family tested here)."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _reference(
    e: int,
    merged_x: list[torch.Tensor],
    sources: list[tuple],
    merged: torch.nn.Module,
    gate_up: torch.Tensor,
    diag_from_source: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential RegMean of expert e: (gate_up 2I x d, down d x I) from each source's routed tokens.

    merged_x[i]: the calibrated model's expert inputs on domain i; sources[i]: (x, top-k, experts
    module) of source i on domain i (same tokens, same order); down's input is ``merged``'s gating of
    ``gate_up`` (expert e's solved gate/up). The alternatives the test must tell apart: the sources'
    own inputs as merged_x (classic), another model's inputs, another gate/up, the diagonal term from
    the sources' inputs.
    """
    gate_up_problems, down_problems = [], []
    for xm, (xs, index, module) in zip(merged_x, sources, strict=True):
        rows = (index == e).any(dim=1)
        xm, xs = xm[rows], xs[rows]
        w_gate_up, w_down = module.gate_up_proj[e].detach().double(), module.down_proj[e].detach().double()
        h_source = _glu(module, xs, w_gate_up)
        h_merged = _glu(merged, xm, gate_up)
        gate_up_problems.append((xm, xs @ w_gate_up.T, w_gate_up, xs if diag_from_source else xm))
        down_problems.append((h_merged, h_source @ w_down.T, w_down, h_source if diag_from_source else h_merged))
    return _least_squares(gate_up_problems, ALPHA), _least_squares(down_problems, ALPHA)


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3"])  # softmax router; sigmoid with selection bias
def test_sequential_experts_equal_direct_least_squares(model_type: str, tmp_path: Path) -> None:
    """Every calibrated expert of every MoE layer equals the float64 least-squares solution of its definition."""
    from transformers import AutoTokenizer

    setup = make_specialists(model_type, tmp_path)  # 3 layers (deepseek_v3: layer 0 dense), float32
    domains = [Domain(str(s), (str(f),)) for s, f in zip(setup["sources"], setup["data"], strict=True)]
    regmean = RegMeanOptions(alpha=ALPHA, min_tokens=1, variant="sequential")
    options = CalibrationOptions(experts=True, regmean=regmean, data=DataOptions(max_length=64), batch_tokens=256)
    out = calibrate(str(setup["average"]), domains, tmp_path / "out", options, progress=False)

    layout = load_layout(out)
    moe = [info.index for info in layout.moe_layers]
    assert len(moe) >= 2 and max(moe) > 0
    names = [f"{layout.layers_module}.{index}.mlp.experts" for index in moe]
    report = json.loads((out / SUMMARY_FILE).read_text())["regmean"]["layers"]

    tokenizer = AutoTokenizer.from_pretrained(setup["average"])
    pad = tokenizer.pad_token_id
    per_domain = [
        list(batches(load_domain(d.source, d.files, tokenizer, options.data)[0], options.batch_tokens, pad))
        for d in domains
    ]
    sources = [_expert_calls(Path(d.source), names, bs) for d, bs in zip(domains, per_domain, strict=True)]
    merged = [_expert_calls(out, names, bs) for bs in per_domain]
    stage1 = [_expert_calls(setup["average"], names, bs) for bs in per_domain]

    worst = 0.0
    for index, name in zip(moe, names, strict=True):
        module, stage1_module = merged[0][name][3], stage1[0][name][3]
        assert not module.is_transposed and module.is_concatenated and not module.has_bias
        real = [calls[name][2] for calls in sources]
        assert all(not r.all() for r in real)  # every domain has padding, which must be left out
        own = [(x[r], i[r], m) for (x, i, r, m) in (calls[name] for calls in sources)]  # source i, real tokens
        merged_x = [calls[name][0][r] for calls, r in zip(merged, real, strict=True)]
        for xm, (xs, _, _) in zip(merged_x, own, strict=True):  # with equal inputs sequential would be classic
            assert _relative(xm, xs) > 1e-2, (name, _relative(xm, xs))
        routed = torch.tensor([[int((i == e).any(1).sum()) for e in range(module.num_experts)] for _, i, _ in own])
        summary = report[str(index)]["experts"]
        assert summary["fallbacks"] == 0 and summary["variant"] == "sequential"
        assert summary["calibrated"] == int((routed.amax(0) > 0).sum()) > 0

        stage1_x = [calls[name][0][r] for calls, r in zip(stage1, real, strict=True)]
        padded = [(x, i, m) for (x, i, _, m) in (calls[name] for calls in sources)]
        padded_x = [calls[name][0] for calls in merged]
        gaps: dict[str, list[float]] = {}
        for e in range(module.num_experts):
            gate_up, down = module.gate_up_proj[e].detach(), module.down_proj[e].detach()
            if routed[:, e].sum() == 0:  # no source routes a token here: stage 1 kept
                assert torch.equal(gate_up, stage1_module.gate_up_proj[e])
                assert torch.equal(down, stage1_module.down_proj[e])
                continue
            solved = gate_up.double()
            want = _reference(e, merged_x, own, module, solved)
            errors = [_relative(gate_up, want[0]), _relative(down, want[1])]
            assert max(errors) < TOLERANCE, (name, e, errors)
            worst = max(worst, *errors)
            stale = stage1_module.gate_up_proj[e].detach().double()
            alternatives = {
                "classic": _reference(e, [x for x, _, _ in own], own, module, solved),
                "uncalibrated": _reference(e, stage1_x, own, module, solved),
                "stale gate/up": _reference(e, merged_x, own, module, stale),
                "source diagonal": _reference(e, merged_x, own, module, solved, diag_from_source=True),
                "padding": _reference(e, padded_x, padded, module, solved),
            }
            for label, (other_gate_up, other_down) in alternatives.items():
                gap = max(_relative(gate_up, other_gate_up), _relative(down, other_down))
                gaps.setdefault(label, []).append(gap)
        for label, gap in gaps.items():  # the check can tell each documented choice from its alternative
            if label == "uncalibrated" and index == moe[0]:  # nothing below is calibrated yet: the same inputs
                assert max(gap) < TOLERANCE, (name, label, gap)
            else:
                assert max(gap) > 10 * TOLERANCE, (name, label, gap)
    assert 0 < worst < TOLERANCE
