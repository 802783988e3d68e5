"""Checkpoint I/O: lazy sharded reading, atomic writing, and clear errors that leave nothing behind."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from moemerge.checkpoint.card import model_card
from moemerge.checkpoint.reader import CheckpointError, CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.cli import main


def test_reader_lists_headers_of_sharded_model(tiny_olmoe: Path) -> None:
    reader = CheckpointReader(tiny_olmoe)
    assert (tiny_olmoe / "model.safetensors.index.json").is_file()
    index = json.loads((tiny_olmoe / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(reader.names()) == set(index)
    info = reader.info("model.layers.0.mlp.gate.weight")
    assert info.shape == (4, 32) and info.dtype == "F32"


def test_round_trip_is_bit_identical_and_loads(tiny_olmoe: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    reader = CheckpointReader(tiny_olmoe)
    out = tmp_path / "copy"
    with CheckpointWriter(out, max_shard_bytes=60_000) as writer:
        for name in reader.names():
            writer.add(name, reader.read(name))
        writer.copy_support_files(tiny_olmoe)
        writer.finalize(expected=set(reader.names()))
    copy = CheckpointReader(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for name in reader.names():
        assert torch.equal(copy.read(name), reader.read(name)), name
    model = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_olmoe)
    ids = torch.randint(0, 128, (2, 7))
    assert torch.equal(model(ids).logits, original(ids).logits)


def test_writer_refuses_existing_target_and_missing_tensors(tiny_olmoe: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="output exists"):
        CheckpointWriter(tiny_olmoe)
    out = tmp_path / "partial"
    with pytest.raises(CheckpointError, match="missing from the output"), CheckpointWriter(out) as writer:
        writer.add("a", torch.randn(3))
        writer.finalize(expected={"a", "b"})
    assert not out.exists() and not list(tmp_path.glob(".partial*"))


def test_overwrite_replaces_target(tmp_path: Path) -> None:
    out = tmp_path / "m"
    for value in (1.0, 2.0):
        with CheckpointWriter(out, overwrite=True) as writer:
            writer.add("t", torch.full((2,), value))
            writer.finalize()
    assert CheckpointReader(out).read("t")[0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _broken_copy(tiny_olmoe: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_olmoe, folder)
    return folder


def _first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def _truncate_header(folder: Path) -> str:
    _first_shard(folder).write_bytes(_first_shard(folder).read_bytes()[:20])
    return "truncated header"


def _remove_shard(folder: Path) -> str:
    _first_shard(folder).unlink()
    return "missing"


def _index_names_missing_tensor(folder: Path) -> str:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = _first_shard(folder).name
    index_path.write_text(json.dumps(index))
    return "model.layers.9.ghost.weight"


def _unsupported_dtype(folder: Path) -> str:
    shard = _first_shard(folder)
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "C64"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    shard.write_bytes(data[:8] + raw + data[8 + length :])
    return f"{name} has unsupported dtype 'C64'"


def _corrupt_config(folder: Path) -> str:
    (folder / "config.json").write_text("{not json")
    return "corrupt JSON config"


def _pickle_only(folder: Path) -> str:
    for p in folder.glob("model*.safetensors*"):
        p.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    return "safetensors only"


@pytest.mark.parametrize(
    "breakage",
    [_truncate_header, _remove_shard, _index_names_missing_tensor, _unsupported_dtype, _corrupt_config, _pickle_only],
)
def test_bad_input_is_one_line_error_naming_the_problem(
    breakage, tiny_olmoe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _broken_copy(tiny_olmoe, tmp_path)
    expected = breakage(folder)
    assert main(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "broken" in err


def test_model_card_has_front_matter_recipe_and_sources() -> None:
    card = model_card(recipe="merge_method: linear\n", sources=["a", "b"], base="base", summary="Linear merge.")
    assert card.startswith("---\n") and "moemerge" in card and "merge_method: linear" in card
    assert "- `base` (base)" in card and "- `a`" in card and card.count("- `base`") == 1
