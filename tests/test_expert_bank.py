"""Experts read piece by piece (``expert_pieces``, ``ExpertBank``) and run one expert at a time (``expert_forward``).

References: transformers' own whole-layer conversion (what ``from_pretrained`` builds) for the bank's
tensors, and transformers' own experts forward (its default ``grouped_mm`` kernel and its eager loop)
for the forward, on tiny models of every family whose experts are stored per expert on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemerge.architectures.layout import expert_pieces, load_layout
from moemerge.architectures.records import FAMILIES
from moemerge.architectures.tiny import save_tiny_model
from moemerge.calibrate.fused_experts import MATRICES, bank_of, experts_module
from moemerge.calibrate.walk import LayerWalker

PER_EXPERT = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.fixture(scope="module", params=PER_EXPERT)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model stored in bfloat16, as released checkpoints are."""
    return save_tiny_model(
        request.param, tmp_path_factory.mktemp(request.param), seed=3, dtype="bfloat16", num_hidden_layers=2
    )


def _moe_index(path: Path) -> int:
    return load_layout(path).moe_layers[0].index


def test_per_expert_families_are_covered() -> None:
    assert set(PER_EXPERT) <= set(FAMILIES)


@pytest.mark.parametrize("held", ["resident", "lazy"])
def test_bank_holds_what_transformers_converts(checkpoint: Path, held: str) -> None:
    """Every expert matrix of the bank equals transformers' conversion of the layer, in the on-disk dtype."""
    layout = load_layout(checkpoint)
    index = _moe_index(checkpoint)
    converted = LayerWalker(str(checkpoint), layout, dtype=torch.float32)
    banked = LayerWalker(str(checkpoint), layout, dtype=torch.float32, experts=held)
    _, reference = experts_module(converted.materialize(index), "converted")
    _, module = experts_module(banked.materialize(index), "banked")
    bank = bank_of(module)
    assert bank is not None and bank.resident == (held == "resident") and bank.dtype == torch.bfloat16
    for name in MATRICES:
        expected = reference._parameters[name]  # float32, converted from bfloat16: exact
        assert module._parameters[name].is_meta
        for e in range(bank.experts):
            assert torch.equal(bank.matrix(name, e).float(), expected[e]), (name, e)
    banked.release(index)
    assert bank_of(module) is None and "forward" not in vars(module)


def test_fused_on_disk_experts_are_not_banked(tmp_path: Path) -> None:
    """GPT-OSS stores its experts fused and transposed: no per-expert pieces, the layer is converted whole."""
    path = save_tiny_model("gpt_oss", tmp_path / "gpt_oss", num_hidden_layers=1)
    walker = LayerWalker(str(path), load_layout(path), experts="resident")
    _, module = experts_module(walker.layers[0], "gpt_oss")
    prefix = f"{walker.layout.layers_module}.0"
    name = next(n for n, m in walker.layers[0].named_modules() if m is module)
    assert expert_pieces(walker.model, f"{prefix}.{name}.gate_up_proj", tuple(module.gate_up_proj.shape)) is None
    assert walker.expert_banks(0) == {}
    layer = walker.materialize(0)
    assert bank_of(experts_module(layer, "gpt_oss")[1]) is None and not module.gate_up_proj.is_meta


def _layer_output(walker: LayerWalker, index: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden, kwargs = walker.layer_inputs(ids, mask)[index]
    with torch.no_grad():
        return walker.materialize(index)(hidden, **kwargs)


@pytest.mark.parametrize("held", ["resident", "lazy"])
def test_expert_forward_equals_transformers(checkpoint: Path, held: str) -> None:
    """The banked layer's output equals transformers' (grouped_mm default: to rounding; eager loop: bit for bit)."""
    layout = load_layout(checkpoint)
    index = _moe_index(checkpoint)
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 100, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    banked = _layer_output(LayerWalker(str(checkpoint), layout, experts=held), index, ids, mask)
    grouped = LayerWalker(str(checkpoint), layout)
    assert grouped.model.config._experts_implementation == "grouped_mm"
    reference = _layer_output(grouped, index, ids, mask)
    torch.testing.assert_close(banked, reference, rtol=1e-5, atol=1e-6)
    eager = LayerWalker(str(checkpoint), layout)
    eager.model.set_experts_implementation("eager")
    assert torch.equal(banked, _layer_output(eager, index, ids, mask))
