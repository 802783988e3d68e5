"""The calibration walk holds neither the output head nor the input embedding (``LayerWalker(head=False)``).

Each batch's embedding rows are read from the memory-mapped checkpoint and run through the model's own
embedding module on renumbered ids; the reference is the walk with the whole embedding loaded (what
``from_pretrained`` builds): every layer's hidden states and keyword arguments must be bit-identical, for
every supported family (some scale their embeddings inside the module or after it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemerge.architectures.layout import embedding_disk_names, load_layout
from moemerge.architectures.records import FAMILIES
from moemerge.architectures.tiny import save_tiny_model
from moemerge.calibrate.walk import LayerWalker, walk_without_head


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return isinstance(b, tuple | list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_embedding_read_by_rows_gives_the_same_layer_inputs(family: str, tmp_path: Path) -> None:
    path = save_tiny_model(family, tmp_path / family, seed=7, dtype="bfloat16", num_hidden_layers=2)
    layout = load_layout(path)
    whole = LayerWalker(str(path), layout)
    walked = LayerWalker(str(path), layout, head=False)
    embedding, _ = embedding_disk_names(walked.model)
    by_rows, skipped = walk_without_head(walked.model)
    assert by_rows == next(iter(embedding)) and by_rows in skipped  # every family's embedding is one table
    assert walked.model.get_input_embeddings().weight.is_meta
    assert walked.model.get_output_embeddings().weight.is_meta
    assert not whole.model.get_output_embeddings().weight.is_meta
    assert not walked.base.norm.weight.is_meta  # the final norm is loaded
    generator = torch.Generator().manual_seed(11)
    vocab = whole.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (3, 9), generator=generator)
    ids[0, :4] = ids[1, :4]  # repeated ids, renumbered once
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding
    expected, got = whole.layer_inputs(ids, mask), walked.layer_inputs(ids, mask)
    for index, ((h_want, kw_want), (h_got, kw_got)) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(h_want, h_got), (family, index)
        assert _same(kw_want, kw_got), (family, index)
    with pytest.raises(ValueError, match="without its output head"):
        walked.final_logits(h_got)
