"""Property-based tests of every parser of untrusted input: the documented one-line error or a correct parse.

For arbitrary bytes, truncations and mutations of valid inputs, each parser either returns a
correct parse or raises its documented error (`CheckpointError`, `RecipeError`, `DataError`,
all ValueErrors with one line naming the file); never another exception, never longer than the
deadline (a hang), and never a Python allocation above a small multiple of the file's size
(tracemalloc: a parser that trusts a length field would allocate what the field says).

    parser                           correct parse means                       examples in CI
    safetensors header (read_header) safetensors.safe_open opens the file to the
                                     same tensors, shapes and dtypes           300 arbitrary bytes,
                                                                               300 truncated/mutated,
                                                                               300 generated headers,
                                                                               11 by hand
    index (CheckpointReader)         tensors of the index, from inside the
                                     model folder                              200
    recipe (load_recipe)             a validated Recipe                        200 arbitrary, 200 mutated,
                                                                               1 alias bomb
    calibration data (read_source)   samples of text or messages               100 arbitrary, 100 mutated
                                                                               (.jsonl .json .txt .csv),
                                                                               100 Parquet

1,812 examples in all, derandomized (the same every run): about 30 s on one busy core.
"""

from __future__ import annotations

import json
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moemerge.checkpoint.reader import ITEM_BYTES, SAFETENSORS_DTYPES, CheckpointError, CheckpointReader, read_header
from moemerge.config import RecipeError, load_recipe
from moemerge.data import DataError, DataSpec
from moemerge.data.readers import read_source


def fuzz(examples: int, *checks: HealthCheck) -> settings:
    """`examples` examples, the same on every CI run; one over 5 s is a hang."""
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=5),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *checks],
        derandomize=True,
        database=None,
    )


def parse(path: Path, parser: Callable[[Path], object], errors: type[Exception]) -> tuple[object, str | None]:
    """(result, None) or (None, message): the parser's documented error only, one line naming the file."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        return parser(path), None
    except errors as err:
        message = str(err)
        assert "\n" not in message and str(path.parent) in message, message  # the file, or a shard beside it
        return None, message
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 1_000_000 + 100 * size, f"{peak} bytes allocated for a {size}-byte file"


SCRATCH = tempfile.TemporaryDirectory(prefix="moemerge-fuzz-")
"""Every example's files, in a folder of their own; removed when the test process ends."""


def in_file(suffix: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp(dir=SCRATCH.name)) / f"input{suffix}"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# safetensors header


def check_header(data: bytes) -> None:
    from safetensors import safe_open

    path = in_file(".safetensors", data)
    parsed, error = parse(path, read_header, CheckpointError)
    try:
        with safe_open(str(path), framework="pt") as handle:
            theirs = {
                name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                for name in handle.keys()
            }
    except Exception as err:  # noqa: BLE001 - whatever the library refuses, our parser must refuse too
        assert error is not None, f"read_header accepted a file safetensors refuses ({err})"
        return
    if error is None:  # both accept: the same tensors
        assert {n: (t.shape, t.dtype) for n, t in parsed.items()} == theirs
    else:  # only dtypes moemerge does not read may be refused where the library accepts
        assert "unsupported dtype" in error, error


def valid_file(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


small_tensors = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.tuples(
        st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8]),
        st.lists(st.integers(0, 4), max_size=3),
    ),
    max_size=4,
).map(lambda spec: {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()})


@fuzz(300)
@given(st.binary(max_size=600))
def test_header_of_arbitrary_bytes(data: bytes) -> None:
    check_header(data)


@fuzz(300)
@given(small_tensors, st.data())
def test_header_of_truncated_and_mutated_files(tensors: dict, data: st.DataObject) -> None:
    raw = bytearray(valid_file(tensors))
    cut = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()):
        raw = raw[:cut]
    for position, value in data.draw(
        st.lists(st.tuples(st.integers(0, max(len(raw) - 1, 0)), st.integers(0, 255)), max_size=3)
    ):
        if raw:
            raw[position] = value
    check_header(bytes(raw))


def entries() -> st.SearchStrategy:
    """Header entries near the rules: mostly well-formed, with wrong types, sizes and offsets mixed in."""
    size = st.one_of(
        st.integers(0, 6), st.integers(-2, 2**64 + 1), st.just(2**63), st.floats(allow_nan=False), st.booleans()
    )
    return st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from([*SAFETENSORS_DTYPES, "U16", "F4", "f32"]), st.integers()),
            "shape": st.one_of(st.lists(size, max_size=3), st.integers(), st.none()),
            "data_offsets": st.one_of(st.lists(size, min_size=0, max_size=3), st.text(max_size=3)),
        },
        optional={"extra": st.integers()},
    )


@fuzz(300)
@given(
    st.dictionaries(st.text(max_size=6), entries(), max_size=4),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()))),
    st.integers(0, 64),
    st.integers(-3, 3),
)
def test_header_of_generated_json(header: dict, metadata: dict | None, data_bytes: int, length_error: int) -> None:
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    text = json.dumps(header).encode()
    length = max(0, len(text) + length_error)
    check_header(struct.pack("<Q", length) + text + bytes(data_bytes))


def test_header_tiles_the_data_exactly_by_hand(tmp_path: Path) -> None:
    """The cases the generators reach rarely, checked against the library too."""

    def file(header: dict, data: int) -> bytes:
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + bytes(data)

    one = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = [
        file({"a": one}, 8),  # valid
        file({"a": one, "b": {**one, "data_offsets": [4, 12]}}, 12),  # overlap
        file({"a": one, "b": {**one, "data_offsets": [12, 20]}}, 20),  # gap
        file({"a": one}, 9),  # data left over
        file({"a": {**one, "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0),  # overflow before the 0
        file({"a": {**one, "shape": [True, 2]}}, 8),
        struct.pack("<Q", 2**63) + b"{}",
        struct.pack("<Q", 2) + "{}".encode("utf-16-le")[:2],
        file({"a": one}, 8).replace(b"[2]", b"[2 ]").replace(b"F32", b"F32"),
        b"\x06\x00\x00\x00\x00\x00\x00\x00" + b"[" * 6,
    ]
    deep = b"[" * 50_000
    cases.append(struct.pack("<Q", len(deep)) + deep)
    for data in cases:
        check_header(data)
    assert read_header(in_file(".safetensors", cases[0]))["a"].nbytes == 8 == 2 * ITEM_BYTES["F32"]


@fuzz(200)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.one_of(
                st.none(),
                st.integers(),
                st.text(max_size=12),
                st.sampled_from(["model.safetensors", "../x", "/etc/passwd", ""]),
            ),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3),
                st.dictionaries(st.sampled_from(["weight_map", "a", "b", "metadata"]), inner, max_size=3),
            ),
            max_leaves=8,
        ).map(lambda value: json.dumps(value).encode()),
    )
)
def test_index_file(index: bytes) -> None:
    folder = Path(tempfile.mkdtemp(dir=SCRATCH.name))
    (folder / "model.safetensors").write_bytes(valid_file({"a": torch.ones(2)}))
    (folder / "model.safetensors.index.json").write_bytes(index)
    reader, error = parse(folder / "model.safetensors.index.json", lambda _: CheckpointReader(folder), CheckpointError)
    if error is None:
        assert set(reader.names()) <= {"a"}
        assert all(reader.info(name).file.parent == folder for name in reader.names())


# ---------------------------------------------------------------------------------------------
# recipe


VALID_RECIPE = yaml.safe_dump(
    {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.7}]}}
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
        "routers": "base",
        "calibrate": {"domains": {"a": ["code.jsonl"]}, "harc": {"gamma": 0.1}, "data": {"max_length": 64}},
    }
)


def check_recipe(data: bytes) -> None:
    path = in_file(".yaml", data)
    recipe, _ = parse(path, load_recipe, RecipeError)
    if recipe is not None:
        assert recipe.merge_method and recipe.models


@fuzz(200)
@given(st.binary(max_size=400))
def test_recipe_of_arbitrary_bytes(data: bytes) -> None:
    check_recipe(data)


@fuzz(200)
@given(st.data())
def test_recipe_mutated(data: st.DataObject) -> None:
    text = bytearray(VALID_RECIPE.encode())
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(text) - 1), st.sampled_from(b"{}[]:,-&*!|>'\"\n #0aZ\xff")), max_size=4)
    )
    for position, value in edits:
        text[position] = value
    cut = data.draw(st.integers(0, len(text)))
    check_recipe(bytes(text[:cut]) if data.draw(st.booleans()) else bytes(text))


def test_recipe_alias_bomb_is_refused() -> None:
    """Nine YAML lines that alias 9**9 values into a field that takes anything: refused before validation walks them."""
    levels = ["&a0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    values = ",\n    ".join(levels)
    text = f"merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: [{{value: [\n    {values}]}}]\n"
    path = in_file(".yaml", text.encode())
    _, error = parse(path, load_recipe, RecipeError)
    assert error is not None and "aliases expand" in error, error
    assert yaml.safe_load(text)["models"][0]["parameters"]["weight"][0]["value"][8][0][0][0][0][0][0][0][0][0] == 0.5


# ---------------------------------------------------------------------------------------------
# calibration data


ROWS = [
    {"text": "first sample"},
    {"text": 'second, with "quotes" and ünïcode'},
    {"messages": [{"role": "user", "content": "hi"}]},
]
VALID = {
    ".jsonl": "\n".join(json.dumps(row) for row in ROWS).encode(),
    ".json": json.dumps(ROWS).encode(),
    ".txt": b"A paragraph.\n\nAnother paragraph\nover two lines.",
    ".csv": b'text\nfirst sample\n"second, with ""quotes"""\n',
}


def check_data(suffix: str, data: bytes) -> None:
    path = in_file(suffix, data)
    read, _ = parse(
        path, lambda p: read_source(DataSpec(path=str(p)), "auto", split_paragraphs=suffix == ".txt"), DataError
    )
    if read is not None:
        assert all(isinstance(sample.text, str) or sample.messages is not None for sample in read.samples)


@fuzz(100)
@given(st.sampled_from(sorted(VALID)), st.binary(max_size=300))
def test_data_of_arbitrary_bytes(suffix: str, data: bytes) -> None:
    check_data(suffix, data)


@fuzz(100)
@given(st.sampled_from(sorted(VALID)), st.data())
def test_data_mutated(suffix: str, data: st.DataObject) -> None:
    text = bytearray(VALID[suffix])
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, len(text) - 1), st.sampled_from(b'{}[]:,"\\\n\r x\x00\xff\xc3')), max_size=4)
    )
    for position, value in edits:
        text[position] = value
    cut = data.draw(st.integers(0, len(text)))
    check_data(suffix, bytes(text[:cut]) if data.draw(st.booleans()) else bytes(text))


@pytest.fixture(scope="module")
def parquet_file() -> bytes:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = Path(tempfile.mkdtemp(dir=SCRATCH.name)) / "valid.parquet"
    pq.write_table(pa.table({"text": ["first sample", "second sample"]}), path)
    return path.read_bytes()


@fuzz(100, HealthCheck.function_scoped_fixture)
@given(st.data())
def test_parquet_truncated_and_mutated(parquet_file: bytes, data: st.DataObject) -> None:
    raw = bytearray(parquet_file)
    for position, value in data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=3)
    ):
        raw[position] = value
    cut = data.draw(st.integers(0, len(raw)))
    check_data(".parquet", bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))
