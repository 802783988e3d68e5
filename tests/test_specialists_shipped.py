"""The shipped olmoe-wide specialists (examples/specialists/checkpoints): they load, run, and are shaped like real MoE.

Fast: seven 3M-parameter checkpoints read from the repository, one short forward pass each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHECKPOINTS = Path(__file__).resolve().parents[1] / "examples" / "specialists" / "checkpoints"
DOMAINS = ("code", "prose", "math")
FAMILIES = ("olmoe-wide", "olmoe-wide-full")


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"{folder}: no safetensors weights"
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_checkpoints_load_and_experts_hold_most_parameters(family: str) -> None:
    """Every model loads with transformers, predicts its own domain's text better than chance, and its routed
    experts hold >= 80 % of the parameters, counted on disk by tensor name and in memory by module."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text_dir = CHECKPOINTS.parent / "data"
    for name in ("base", *DOMAINS):
        folder = CHECKPOINTS / family / name
        tensors = _tensors(folder)
        on_disk = sum(t.numel() for n, t in tensors.items() if ".mlp.experts." in n) / sum(
            t.numel() for t in tensors.values()
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        experts = {id(p) for layer in model.model.layers for p in layer.mlp.experts.parameters()}
        params = list(model.parameters())
        in_memory = sum(p.numel() for p in params if id(p) in experts) / sum(p.numel() for p in params)
        assert on_disk >= 0.8 and in_memory == pytest.approx(on_disk, abs=1e-9), (folder, on_disk, in_memory)
        assert model.config.num_experts_per_tok > 1 and len(model.model.layers) > 4
        domain = name if name in DOMAINS else "prose"
        sample = json.loads((text_dir / f"{domain}.jsonl").read_text().splitlines()[0])["text"]
        ids = AutoTokenizer.from_pretrained(folder)(sample, return_tensors="pt")["input_ids"][:, :128]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert loss < 0.8 * torch.log(torch.tensor(float(model.config.vocab_size))).item(), (folder, loss)


def test_full_and_esft_specialists_share_one_base() -> None:
    """Full fine-tunes changed every tensor; ESFT ones only routers and experts; both from the same base weights."""
    esft, full = CHECKPOINTS / "olmoe-wide", CHECKPOINTS / "olmoe-wide-full"
    base = _tensors(esft / "base")
    shared = _tensors(full / "base")
    assert set(base) == set(shared) and all(base[n].equal(shared[n]) for n in base)
    for domain in DOMAINS:
        tuned = _tensors(full / domain)
        assert [n for n in base if tuned[n].equal(base[n])] == [], f"full {domain}: tensors left at the base"
        tuned = _tensors(esft / domain)
        changed = {n for n in base if not tuned[n].equal(base[n])}
        assert changed and all(".mlp.experts." in n or ".mlp.gate." in n for n in changed), domain
        assert any(".mlp.gate." in n for n in changed) and any(".mlp.experts." in n for n in changed), domain
