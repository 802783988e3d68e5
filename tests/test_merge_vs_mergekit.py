"""The whole stage-1 merge against mergekit 0.1.5, from the same YAML, on tiny Mixtral and Qwen3-MoE.

What mergekit writes differs from moemerge in layout, not in values:

- mergekit 0.1.5 targets transformers 5's in-memory layout: it reads the per-expert tensors on
  disk (`experts.{e}.w1/w2/w3` for Mixtral, `experts.{e}.gate_proj/up_proj/down_proj` for
  Qwen3-MoE), fuses them into `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj`
  [E, H, I], and writes those; it also writes Mixtral's router `block_sparse_moe.gate` as
  `mlp.gate`. moemerge keeps the on-disk names. The comparison maps mergekit's output back with
  transformers' own save-time conversion (`revert_weight_conversion`).
- Because mergekit merges a fused tensor of all experts, methods that rank entries within a
  tensor (TIES and Breadcrumbs trim by magnitude over the whole tensor) choose different
  entries for expert weights than moemerge, which trims each expert on its own. For those
  tensors the test checks that moemerge's kernel on the fused stack reproduces mergekit, i.e.
  the difference is the unit of merging, not the arithmetic.

Random methods: DELLA with density 1 is deterministic and compared exactly; DELLA at density
0.5 and DARE are compared by statistics (fraction of entries changed, L1 norm of the change).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from moemerge.checkpoint.reader import CheckpointReader  # noqa: E402
from moemerge.checkpoint.writer import CheckpointWriter  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe")
WEIGHTS = (0.6, 0.9)
DENSITIES = (0.5, 0.7)


def _noisy_copy(base: Path, out: Path, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with CheckpointReader(base) as reader, CheckpointWriter(out) as writer:
        for name in reader.names():
            t = reader.read(name)
            writer.add(name, t + 0.02 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t)
        writer.copy_support_files(base)
        writer.finalize()
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> dict:
    from transformers import AutoConfig

    from moemerge.architectures.layout import build_meta_model
    from moemerge.architectures.tiny import save_tiny_model

    root = tmp_path_factory.mktemp(request.param)
    base = save_tiny_model(request.param, root / "base", seed=2)
    sources = [_noisy_copy(base, root / f"s{i}", seed=20 + i) for i in range(2)]
    return {"root": root, "base": base, "sources": sources, "meta": build_meta_model(AutoConfig.from_pretrained(base))}


def _recipe(family: dict, method: str, per_source: list[dict], shared: dict | None = None) -> str:
    recipe = {
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(family["base"])}),
        "models": [{"model": str(s), "parameters": p} for s, p in zip(family["sources"], per_source, strict=True)],
        "dtype": "float32",
    }
    if shared:
        recipe["parameters"] = shared
    return yaml.safe_dump(recipe, sort_keys=False)


def _both(family: dict, tag: str, text: str) -> tuple[dict, dict, dict]:
    """(ours, mergekit's mapped to on-disk names, mergekit's as written) for one recipe text."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file
    from transformers.core_model_loading import revert_weight_conversion

    from moemerge.pipeline.stage1 import merge_checkpoints

    path = family["root"] / f"{tag}.yaml"
    path.write_text(text)
    ours_dir = merge_checkpoints(path, family["root"] / f"{tag}-ours", progress=False)
    theirs_dir = family["root"] / f"{tag}-mergekit"
    options = MergeOptions(lazy_unpickle=False, copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(theirs_dir), options=options)
    raw = {}
    for shard in sorted(theirs_dir.glob("*.safetensors")):
        raw |= load_file(shard)
    with CheckpointReader(ours_dir) as reader:
        ours = {n: reader.read(n) for n in reader.names()}
    return ours, revert_weight_conversion(family["meta"], dict(raw)), raw


def _fused_names(family: dict, raw: dict) -> set[str]:
    """On-disk names that mergekit merged as part of a fused tensor (one-to-many conversions)."""
    from transformers.core_model_loading import revert_weight_conversion

    fused = set()
    for name, tensor in raw.items():
        reverted = revert_weight_conversion(family["meta"], {name: tensor})
        if len(reverted) > 1:
            fused |= set(reverted)
    return fused


def _assert_same_layout(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name


@pytest.mark.parametrize(
    "method, per_source, shared",
    [
        ("linear", [{"weight": w} for w in WEIGHTS], None),
        ("task_arithmetic", [{"weight": w} for w in WEIGHTS], {"lambda": 0.8}),
        ("della", [{"weight": w, "density": 1.0, "epsilon": 0.1} for w in WEIGHTS], None),
    ],
)
def test_elementwise_methods_match_every_tensor(family, method, per_source, shared):
    ours, theirs, raw = _both(family, method, _recipe(family, method, per_source, shared))
    _assert_same_layout(ours, theirs)
    assert _fused_names(family, raw), "expected mergekit to fuse the experts"
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


@pytest.mark.parametrize("method, extra", [("ties", {}), ("breadcrumbs", {"gamma": 0.05})])
def test_magnitude_methods_match_except_the_unit_of_merging(family, method, extra):
    from transformers import AutoModelForCausalLM

    from moemerge.merge.registry import TensorContext, get_method

    per_source = [{"weight": w, "density": d, **extra} for w, d in zip(WEIGHTS, DENSITIES, strict=True)]
    ours, theirs, raw = _both(family, method, _recipe(family, method, per_source))
    _assert_same_layout(ours, theirs)
    fused = _fused_names(family, raw)
    for name in set(ours) - fused:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)

    # mergekit's expert tensors are our kernel applied to the fused [E, ...] stack
    state = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in [family["base"], *family["sources"]]]
    kernel = get_method(method)
    params, source_params = kernel.parse_params({}, per_source)
    for name in [n for n in raw if n.endswith(("gate_up_proj", "down_proj")) and "experts" in n]:
        merged = kernel(state[0][name], [s[name] for s in state[1:]], source_params, params, TensorContext(name))
        torch.testing.assert_close(merged, raw[name], msg=name)


def _delta_stats(merged: dict, base: dict) -> tuple[float, float]:
    changed = total = 0
    l1 = 0.0
    for name, t in merged.items():
        delta = t.double() - base[name].double()
        changed += int((delta != 0).sum())
        total += delta.numel()
        l1 += float(delta.abs().sum())
    return changed / total, l1


@pytest.mark.parametrize(
    "method, per_source",
    [
        ("della", [{"weight": w, "density": 0.5, "epsilon": 0.2} for w in WEIGHTS]),
        ("dare_ties", [{"weight": w, "density": 0.4} for w in WEIGHTS]),
    ],
)
def test_random_methods_match_in_statistics(family, method, per_source):
    ours, theirs, _ = _both(family, f"{method}-random", _recipe(family, method, per_source))
    _assert_same_layout(ours, theirs)
    with CheckpointReader(family["base"]) as reader:
        base = {n: reader.read(n) for n in reader.names()}
    (frac_ours, l1_ours), (frac_theirs, l1_theirs) = _delta_stats(ours, base), _delta_stats(theirs, base)
    density = per_source[0]["density"]
    expected = 1 - (1 - density) ** 2  # an entry changes when either source keeps it
    assert frac_ours == pytest.approx(expected, abs=0.01)
    assert frac_theirs == pytest.approx(expected, abs=0.01)
    assert l1_ours == pytest.approx(l1_theirs, rel=0.03)
