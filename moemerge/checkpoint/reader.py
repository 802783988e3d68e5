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

ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
ITEM_BYTES |= {"I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of each dtype code."""


def is_float_code(code: str) -> bool:
    """Whether a safetensors dtype code is a floating type (merged, and stored in the output dtype)."""
    return code.startswith(("F", "BF"))


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

        return math.prod(self.shape) * ITEM_BYTES[self.dtype]


MAX_HEADER_BYTES = 100_000_000
"""The largest header the safetensors library accepts."""

_USIZE = 2**64
"""Sizes and offsets are unsigned 64-bit integers in the format."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header, with every rule the safetensors library applies when it opens the file.

    8-byte little-endian length, then that many bytes of UTF-8 JSON (an object starting with `{`):
    tensor name -> {dtype, shape, data_offsets}, plus an optional `__metadata__` of strings. The
    tensors' byte ranges must tile the data after the header exactly, each as long as its shape and
    dtype say. Any file that passes opens with `safetensors.safe_open` to the same tensors; any
    other is a one-line CheckpointError naming the file (and the tensor), read no further than its size.
    """
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
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header of {length} bytes exceeds safetensors' {MAX_HEADER_BYTES}")
        raw = handle.read(length)
    try:
        if not raw.startswith(b"{"):
            raise ValueError("it does not start with '{'")
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(header, dict):
            raise ValueError("it is not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        message = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: corrupt safetensors header ({message})") from None
    return _check_entries(path, header, size - 8 - length)


def _is_size(value: object) -> bool:
    return type(value) is int and 0 <= value < _USIZE


def _check_entries(path: Path, header: dict, data_size: int) -> dict[str, TensorInfo]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header ({what})")

    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map names to strings")
    ranges = []
    tensors = {}
    for name, entry in header.items():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise bad(f"tensor name {name!r} is not UTF-8") from None
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise bad(f"tensor {name} needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise bad(f"tensor {name} has shape {shape!r}; expected a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
            raise bad(f"tensor {name} has data_offsets {offsets!r}; expected [begin, end]")
        nbytes = ITEM_BYTES[dtype]
        for dim in shape:  # as the library multiplies: an overflow on the way is an error, even before a 0
            nbytes *= dim
            if nbytes >= _USIZE:
                raise bad(f"tensor {name}: shape {shape} overflows")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name} is truncated (data ends at {end}, file has {data_size})")
        if end - begin != nbytes:
            raise bad(f"tensor {name}: data_offsets {offsets} hold {end - begin} bytes, shape and dtype need {nbytes}")
        ranges.append((begin, end, name))
        tensors[name] = TensorInfo(name, tuple(shape), dtype, path)
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            raise bad(f"tensor {name}'s data starts at {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_size:
        raise bad(f"the tensors' data ends at {position} but the file holds {data_size} bytes after the header")
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
                weight_map = json.loads(index_path.read_bytes().decode("utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as err:
                message = " ".join(str(err).split()) or type(err).__name__
                raise CheckpointError(f"{index_path}: corrupt index ({type(err).__name__}: {message})") from None
            outside = sorted(s for s in set(weight_map.values()) if Path(s).name != s or s in ("", ".", ".."))
            if outside:
                raise CheckpointError(f"{index_path}: shard {outside[0]!r} is not a file name in the model folder")
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

    def _shard(self, name: str, device: str = "cpu") -> Any:
        """The open safetensors handle of the shard holding `name` (opened once, memory-mapped)."""
        from safetensors import safe_open

        info = self.info(name)
        if info.file not in self._handles:
            self._handles[info.file] = safe_open(str(info.file), framework="pt", device=device)
        return self._handles[info.file]

    def read(self, name: str, device: str = "cpu") -> torch.Tensor:
        """One tensor by its on-disk name, memory-mapped from its shard."""
        return self._shard(name, device).get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first axis) of one tensor, reading only their bytes."""
        return self._shard(name).get_slice(name)[start:stop]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
