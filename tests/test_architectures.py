"""Every MoE family of the installed transformers is either supported and verified, or excluded with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemerge.architectures.layout import ArchitectureError, detect_family, load_layout, transformers_moe_families
from moemerge.architectures.records import FAMILIES, UNSUPPORTED
from moemerge.architectures.tiny import save_tiny_model
from moemerge.checkpoint.reader import CheckpointReader

LIBRARY_FAMILIES = transformers_moe_families()


def test_library_has_many_moe_families() -> None:
    assert len(LIBRARY_FAMILIES) >= 25
    assert {"olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss"} <= set(FAMILIES)
    assert {"granitemoe", "glm4_moe"} <= set(FAMILIES)


def _on_disk_owner(reader: CheckpointReader, tensor: torch.Tensor) -> set[str]:
    """On-disk names whose data equals `tensor` bit for bit (random init makes this unique)."""
    return {
        n
        for n in reader.names()
        if reader.info(n).shape == tuple(tensor.shape) and torch.equal(reader.read(n), tensor.detach().cpu())
    }


@pytest.mark.parametrize("model_type", LIBRARY_FAMILIES)
def test_family_router_tensors_match_loaded_model(model_type: str, tmp_path: Path) -> None:
    if model_type in UNSUPPORTED:
        pytest.skip(f"unsupported: {UNSUPPORTED[model_type]}")
    assert model_type in FAMILIES, f"{model_type} is neither supported nor listed as unsupported"
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(model_type, tmp_path / "m", seed=3)
    layout = load_layout(folder)
    assert layout.family.model_type == model_type
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    reader = CheckpointReader(folder)

    expected, selection = set(), set()
    routers = [(n, m) for n, m in loaded.named_modules() if type(m).__name__.endswith("Router")]
    assert len(routers) == len(layout.moe_layers)
    for name, module in routers:
        for param_name, param in module.named_parameters():
            if param_name.rsplit(".", 1)[-1] == layout.family.selection_bias:
                continue
            owners = _on_disk_owner(reader, param)
            assert len(owners) == 1, f"{name}: router parameter found {len(owners)} times on disk"
            expected |= owners
        if layout.family.selection_bias:
            parent = loaded.get_submodule(name.rsplit(".", 1)[0])
            candidates = [
                *module.named_buffers(),
                *module.named_parameters(),
                *parent.named_buffers(recurse=False),
                *parent.named_parameters(recurse=False),
            ]
            bias = next(t for n, t in candidates if n.rsplit(".", 1)[-1] == layout.family.selection_bias)
            selection |= _on_disk_owner(reader, bias)
    assert set(layout.router_tensors) == expected
    assert set(layout.selection_biases) == selection
    for lookalike in layout.lookalikes:
        assert lookalike in reader and lookalike not in layout.router_tensors


def test_unknown_family_lists_known_ones() -> None:
    with pytest.raises(ArchitectureError, match="known families: .*olmoe"):
        detect_family({"model_type": "llama"})


def test_unsupported_family_gives_reason() -> None:
    with pytest.raises(ArchitectureError, match="not supported: SparseMixer"):
        detect_family({"model_type": "phimoe"})


def test_family_detected_from_architectures_when_model_type_missing() -> None:
    assert detect_family({"architectures": ["OlmoeForCausalLM"]}).model_type == "olmoe"


def test_architectures_doc_lists_every_family() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "ARCHITECTURES.md").read_text()
    for model_type in LIBRARY_FAMILIES:
        assert f"`{model_type}`" in doc, f"docs/ARCHITECTURES.md does not mention {model_type}"
