"""The MoE-block swap measurement (examples/specialists/moe_ceiling.py) on tiny models.

The swap is checked tensor by tensor against the on-disk names moemerge's layout gives for each MoE layer;
the shares on hand-checkable cases: a model that differs from the specialist only inside the MoE blocks
has ceiling and converse 1, one that differs only outside them has 0.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from conftest import make_specialists

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("moe_ceiling", ROOT / "examples" / "specialists" / "moe_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("model_type", ["olmoe", "glm4_moe"])
def test_swap_replaces_exactly_the_moe_blocks(model_type: str, tmp_path: Path) -> None:
    """Every tensor of an MoE layer's mlp is the donor's, every other tensor the target's (GLM: layer 0 is dense)."""
    from moemerge.architectures.layout import load_layout

    setup = make_specialists(model_type, tmp_path)
    target, donor = setup["average"], setup["sources"][0]
    out = _module().swap_moe_blocks(target, donor, tmp_path / "swapped")
    layout = load_layout(target)
    prefixes = tuple(f".layers.{layer.index}.mlp." for layer in layout.moe_layers)
    got, mine, theirs = _tensors(out), _tensors(target), _tensors(donor)
    assert set(got) == set(mine) == set(theirs)
    swapped = [name for name in got if any(p in name for p in prefixes)]
    assert set(layout.router_tensors) <= set(swapped) and any("experts" in n for n in swapped)
    if model_type == "glm4_moe":
        assert layout.dense_layers == (0,) and any(".layers.0.mlp." in n for n in got if n not in swapped)
        assert set(layout.selection_biases) <= set(swapped)
    for name, tensor in got.items():
        expected = theirs[name] if name in swapped else mine[name]
        assert tensor.dtype.is_floating_point and tensor.float().equal(expected.float()), name
        if name in swapped:
            assert not tensor.float().equal(mine[name].float()), f"{name}: the test's models must differ there"
    assert (out / "tokenizer.json").is_file() and not (tmp_path / "swapped.partial").exists()


@pytest.mark.parametrize(
    ("part", "names"),
    [("head", {"lm_head.weight"}), ("embeddings", {"model.embed_tokens.weight"}), ("attention", {".self_attn."})],
)
def test_other_parts_swap_exactly_their_tensors(part: str, names: set[str], tmp_path: Path) -> None:
    setup = make_specialists("olmoe", tmp_path)
    target, donor = setup["average"], setup["sources"][0]
    out = _module().swap_parts(target, donor, tmp_path / "swapped", part)
    got, mine, theirs = _tensors(out), _tensors(target), _tensors(donor)
    swapped = {n for n in got if any(pattern in n for pattern in names)}
    assert swapped and set(got) == set(mine)
    for name, tensor in got.items():
        assert tensor.equal((theirs if name in swapped else mine)[name].float()), name
        if name in swapped and tensor.dim() == 2:  # the test's models differ there (norms are all ones in both)
            assert not tensor.equal(mine[name].float()), name


def test_swapping_a_model_into_itself_changes_nothing(tmp_path: Path) -> None:
    setup = make_specialists("olmoe", tmp_path, num_sources=1)
    source = setup["sources"][0]
    out = _module().swap_moe_blocks(source, source, tmp_path / "self")
    got, own = _tensors(out), _tensors(source)
    assert set(got) == set(own) and all(got[n].equal(own[n].float()) for n in own)


def test_shares_on_hand_checkable_models(tmp_path: Path) -> None:
    """X = specialist with the average's MoE blocks: swapping the specialist's back gives the specialist (ceiling 1),
    and the specialist with X's blocks is X (converse 1). Y = average with the specialist's blocks: the swap changes
    nothing (ceiling 0, converse 0). The average's own measurement reuses X's and Y's checkpoints' losses."""
    from moemerge.calibrate.runner import Domain
    from moemerge.data import DataOptions

    ceiling = _module()
    setup = make_specialists("olmoe", tmp_path, num_sources=2)
    source, average = setup["sources"][0], setup["average"]
    x = ceiling.swap_moe_blocks(source, average, tmp_path / "x")
    y = ceiling.swap_moe_blocks(average, source, tmp_path / "y")
    domain = Domain(str(source), (str(setup["data"][0]),))
    data = DataOptions(max_length=64, heldout=4, seed=0)
    merged = {"average": str(average), "x": str(x), "y": str(y)}
    result = ceiling.measure(merged, [domain], data, tmp_path / "work", batch_tokens=256, parts=["head"])
    (label,) = result["x"]
    xs, ys, avg = result["x"][label], result["y"][label], result["average"][label]
    # random tiny models: small but real gaps (the swaps rebuild the same float32 tensors, so losses match exactly)
    assert abs(xs["merged"] - xs["specialist"]) > 2e-5 and abs(ys["merged"] - ys["specialist"]) > 2e-5
    assert xs["merged_with_specialist_moe"] == pytest.approx(xs["specialist"], abs=1e-7)
    assert xs["ceiling"] == pytest.approx(1.0, abs=1e-3) and xs["converse"] == pytest.approx(1.0, abs=1e-3)
    assert ys["merged_with_specialist_moe"] == pytest.approx(ys["merged"], abs=1e-7)
    assert ys["ceiling"] == pytest.approx(0.0, abs=1e-3) and ys["converse"] == pytest.approx(0.0, abs=1e-3)
    assert avg["specialist_with_merged_moe"] == pytest.approx(xs["merged"], abs=1e-7)
    assert avg["merged_with_specialist_moe"] == pytest.approx(ys["merged"], abs=1e-7)
    gap = avg["merged"] - avg["specialist"]
    assert avg["ceiling"] == pytest.approx((avg["merged"] - ys["merged"]) / gap, rel=1e-9)
    assert avg["converse"] == pytest.approx((xs["merged"] - avg["specialist"]) / gap, rel=1e-9)
    assert not math.isnan(ceiling.mean_share(result["average"], "ceiling"))
    # y holds the specialist's MoE blocks; its head is the average's: swapping the specialist's head in as well
    # leaves only attention, embeddings and norms averaged
    head = result["y"][label]["parts"]["head"]
    assert head["ceiling"] == pytest.approx(
        (ys["merged"] - head["merged_with_specialist"]) / (ys["merged"] - ys["specialist"])
    )
    assert ceiling.mean_share(result["y"], "ceiling", "head") == pytest.approx(head["ceiling"])
    assert not (tmp_path / "work" / "domain0").exists(), "the swapped checkpoints were left behind"


def test_swap_refuses_an_existing_output_and_models_without_moe(tmp_path: Path) -> None:
    from moemerge.architectures.tiny import save_tiny_model

    ceiling = _module()
    setup = make_specialists("olmoe", tmp_path, num_sources=1)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="taken: output folder exists"):
        ceiling.swap_moe_blocks(setup["average"], setup["sources"][0], tmp_path / "taken")
    dense = save_tiny_model("llama", tmp_path / "dense")
    with pytest.raises(ValueError, match="no MoE layer"):
        ceiling.swap_moe_blocks(dense, dense, tmp_path / "dense-out")
    with pytest.raises(ValueError, match="unknown part 'norms'"):
        ceiling.swap_parts(setup["average"], setup["sources"][0], tmp_path / "norms", "norms")
