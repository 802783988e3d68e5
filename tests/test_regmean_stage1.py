"""Stage-1 `merge_method: regmean`: RegMean of every linear layer against hooks, the rest by its per-tensor rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_specialists

from moemerge.architectures.layout import load_layout
from moemerge.calibrate.runner import SUMMARY_FILE
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.config import RecipeError, load_recipe
from moemerge.data import DataOptions, batches, load_domain
from moemerge.merge.plan import MergeError
from moemerge.pipeline.stage1 import merge_checkpoints

ALPHA = 0.8
CALIBRATE = {"data": {"max_length": 40}, "batch_tokens": 256, "regmean": {"alpha": ALPHA, "min_tokens": 4}}


def _recipe(tmp_path: Path, setup: dict, method: str = "regmean", **changes) -> Path:
    sources = [str(s) for s in setup["sources"]]
    recipe = {
        "merge_method": method,
        "base_model": str(setup["base"]),
        "models": [{"model": s} for s in sources],
        "dtype": "float32",
        "calibrate": dict(CALIBRATE, domains={s: [str(f)] for s, f in zip(sources, setup["data"], strict=True)}),
    }
    recipe.update(changes)
    path = tmp_path / f"{method}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _linear_inputs(source: str, files: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs of the named nn.Linear modules over the source's real calibration tokens, by plain hooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, n=name: seen[n].append(args[0]))
    samples, _ = load_domain(source, tuple(files), tokenizer, DataOptions.model_validate(CALIBRATE["data"]))
    for batch in batches(samples, CALIBRATE["batch_tokens"], tokenizer.pad_token_id):
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        real = batch.attention_mask.reshape(-1).bool()
        for name in names:
            seen[name][-1] = seen[name][-1].reshape(-1, seen[name][-1].shape[-1])[real]
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


def test_regmean_stage1_solves_every_linear_and_keeps_the_rest(tmp_path: Path) -> None:
    """Attention maps equal RegMean's closed form built here from hooks; embeddings, norms, head, routers = linear."""
    setup = make_specialists("olmoe", tmp_path, num_hidden_layers=2)
    out = merge_checkpoints(_recipe(tmp_path, setup), tmp_path / "regmean", progress=False)
    average = merge_checkpoints(_recipe(tmp_path, setup, method="linear"), tmp_path / "linear", progress=False)
    assert not list(tmp_path.glob(".regmean.regmean-*")), "scratch folder left behind"

    merged, linear = CheckpointReader(out), CheckpointReader(average)
    assert set(merged.names()) == set(linear.names())
    layout = load_layout(out)
    solved = {n for n in merged.names() if ".self_attn." in n and n.endswith("proj.weight")} | {
        n for n in merged.names() if ".mlp.experts." in n
    }
    for name in sorted(set(merged.names()) - solved):  # embeddings, norms, lm_head, routers: the rest rule
        assert torch.equal(merged.read(name), linear.read(name)), name
    assert layout.router_tensors <= set(merged.names()) - solved
    changed = {n for n in solved if not torch.equal(merged.read(n), linear.read(n))}
    assert changed == solved, sorted(solved - changed)[:3]

    sources = [str(s) for s in setup["sources"]]
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.self_attn.k_proj"]
    inputs = [_linear_inputs(s, [str(f)], names) for s, f in zip(sources, setup["data"], strict=True)]
    for name in names:
        rhs, gram = 0, 0
        for source, xs in zip(sources, inputs, strict=True):
            g = xs[name].T @ xs[name]
            g_alpha = ALPHA * g + (1 - ALPHA) * torch.diag(torch.diag(g))
            rhs = rhs + CheckpointReader(source).read(f"{name}.weight").double() @ g_alpha
            gram = gram + g_alpha
        want = torch.linalg.solve(gram, rhs, left=False)  # W = (sum W_i G_i) (sum G_i)^-1
        got = merged.read(f"{name}.weight").double()
        assert (got - want).norm() <= 1e-4 * want.norm(), name

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["options"]["routers"] is False and summary["layers"] == []
    assert summary["regmean"]["options"]["linear_layers"] == "all"
    assert "merged by RegMean" in (out / "README.md").read_text()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.randint(3, 90, (1, 8))).logits).all()


def test_regmean_rest_rule_and_bad_recipes(tmp_path: Path) -> None:
    """`rest` picks the per-tensor method for the rest; missing text or a bad rest is an error before any output.

    GLM-4-MoE without shared experts: a dense first layer, a sigmoid router, and zero-width shared-expert maps
    (nothing to solve there; they are copied).
    """
    setup = make_specialists("glm4_moe", tmp_path, num_hidden_layers=2, n_shared_experts=0)
    out = merge_checkpoints(
        _recipe(tmp_path, setup, parameters={"rest": "task_arithmetic", "lambda": 0.5}), tmp_path / "ta-rest"
    )
    reference = merge_checkpoints(
        _recipe(tmp_path, setup, method="task_arithmetic", parameters={"lambda": 0.5}), tmp_path / "ta"
    )
    merged, ta = CheckpointReader(out), CheckpointReader(reference)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged.read(name), ta.read(name)), name
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight"):
        assert not torch.equal(merged.read(name), ta.read(name)), name  # dense MLP and expert re-solved
    assert merged.info("model.layers.1.mlp.shared_experts.up_proj.weight").shape[0] == 0

    no_text = _recipe(tmp_path, setup)
    raw = yaml.safe_load(no_text.read_text())
    del raw["calibrate"]
    no_text.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="calibrate.domains"):
        load_recipe(no_text)
    with pytest.raises(MergeError, match="parameters.rest"):
        merge_checkpoints(_recipe(tmp_path, setup, parameters={"rest": "regmean"}), tmp_path / "bad")
    with pytest.raises(MergeError, match="alpha.*calibrate.regmean"):
        merge_checkpoints(_recipe(tmp_path, setup, parameters={"alpha": 0.9}), tmp_path / "bad")
    one_domain = _recipe(tmp_path, setup)
    raw = yaml.safe_load(one_domain.read_text())
    raw["calibrate"]["domains"].pop(str(setup["sources"][1]))
    one_domain.write_text(yaml.safe_dump(raw))
    with pytest.raises(MergeError, match=f"no calibration text for source {setup['sources'][1]}"):
        merge_checkpoints(one_domain, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_interrupted_regmean_resumes_from_its_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed in the walk leaves step 1 and the walk's finished layers; the rerun reuses them and cleans up."""
    import moemerge.calibrate.experts as experts

    setup = make_specialists("qwen3_moe", tmp_path, num_hidden_layers=2)
    recipe = _recipe(tmp_path, setup)
    reference = merge_checkpoints(recipe, tmp_path / "reference", progress=False)

    class Killed(Exception):
        pass

    original, calls, kill = experts.RegMeanCalibration._calibrate, [], [True]

    def killed_at_layer_1(self, index, layer):
        calls.append(index)
        if index == 1 and kill:  # the first run only
            kill.clear()
            raise Killed
        return original(self, index, layer)

    monkeypatch.setattr(experts.RegMeanCalibration, "_calibrate", killed_at_layer_1)
    with pytest.raises(Killed):
        merge_checkpoints(recipe, tmp_path / "out", progress=False)
    (scratch,) = tmp_path.glob(".out.regmean-*")
    assert (scratch / "rest").is_dir() and not (tmp_path / "out").exists() and calls == [0, 1]

    calls.clear()
    out = merge_checkpoints(recipe, tmp_path / "out", progress=False)
    # layer 0 replayed, not re-solved: the walk's fingerprint (which stamps step 1's files) matched, so the
    # step-1 model was reused rather than rewritten
    assert calls == [1]
    assert not scratch.exists()
    merged, expected = CheckpointReader(out), CheckpointReader(reference)
    for name in expected.names():
        assert torch.equal(merged.read(name), expected.read(name)), name
