"""Lazy reader of Hugging Face model folders: safetensors headers first, one tensor at a time.

The headers are parsed here (8-byte little-endian length, then JSON) so that every defect is
reported with the file and tensor it concerns before any data is read; the data itself is then
read memory-mapped through `safetensors.safe_open`, one tensor at a time, by its on-disk name.
Pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`) are refused: loading them can run code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
"""safetensors dtype codes moemerge reads, with the torch dtype each becomes."""

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class CheckpointError(ValueError):
    """A model folder that cannot be read; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to plan a merge without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def nbytes(self) -> int:
        import math

        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(self.dtype, 1)
        return math.prod(self.shape) * size


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header, checking it against the file's size."""
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file is missing")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated header (file has {size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise CheckpointError(f"{path}: truncated header (declares {length} bytes, file has {size})")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from err
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
        start, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name} is truncated (data ends at {end}, file has {data_size})")
        tensors[name] = TensorInfo(name, tuple(entry["shape"]), dtype, path)
    return tensors


def folder_stamp(model_dir: str | Path) -> list:
    """Path, then name, size and modification time of each file of a folder: a rebuilt checkpoint differs.

    What a resumable run's leftovers are keyed on; hashing the weights would read every byte first.
    """
    folder = Path(model_dir).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return [str(folder)] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


class CheckpointReader:
    """One model folder: its config and its tensors by on-disk name, read lazily."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a model folder")
        self._tensors = self._index()
        self._handles: dict[Path, Any] = {}

    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.model_dir / INDEX_FILE
        single_path = self.model_dir / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: corrupt index ({err!r})") from err
            headers: dict[str, dict[str, TensorInfo]] = {}
            tensors = {}
            for name, shard in weight_map.items():
                shard_path = self.model_dir / shard
                if shard not in headers:
                    if not shard_path.is_file():
                        raise CheckpointError(f"{shard_path}: shard named by the index for tensor {name} is missing")
                    headers[shard] = read_header(shard_path)
                if name not in headers[shard]:
                    raise CheckpointError(f"{index_path}: names tensor {name} in {shard}, which does not contain it")
                tensors[name] = headers[shard][name]
            return tensors
        if single_path.is_file():
            return read_header(single_path)
        pickles = [p.name for pattern in PICKLE_PATTERNS for p in self.model_dir.glob(pattern)]
        if pickles:
            raise CheckpointError(
                f"{self.model_dir}: only pickle weights ({', '.join(sorted(pickles))}); moemerge loads safetensors "
                "only, because unpickling can run arbitrary code. Convert them to safetensors first."
            )
        raise CheckpointError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")

    @cached_property
    def config(self) -> dict[str, Any]:
        from moemerge.architectures.layout import read_config_dict

        return read_config_dict(self.model_dir)

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise CheckpointError(f"{self.model_dir}: has no tensor {name}")
        return self._tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def read(self, name: str, device: str = "cpu") -> torch.Tensor:
        """One tensor by its on-disk name, memory-mapped from its shard."""
        from safetensors import safe_open

        info = self.info(name)
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(str(info.file), framework="pt", device=device)
        return self._handles[info.file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
