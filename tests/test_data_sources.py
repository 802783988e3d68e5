"""Data sources beyond JSONL: CSV and Parquet files, row formats (messages, text, column templates), the
source-spec and model-reference parsers (hand-written cases and Hypothesis properties)."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import chat, make_tokenizer

from moemerge.checkpoint.hub import HubError, ModelRef, is_hub_ref, model_ref_text, parse_model_ref
from moemerge.data import DataError, DataOptions, DataSpec, SpecError, load_domain, parse_data_source
from moemerge.data.spec import parse_template


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran far away".split()
    return [
        {"problem": " ".join(rng.choices(words, k=rng.randint(1, 6))), "solution": f"row{i}", "n": i} for i in range(n)
    ]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    return path


def _decoded(domain, tokenizer) -> list[str]:
    return [tokenizer.decode(s, skip_special_tokens=True) for s in domain.samples]


@pytest.mark.parametrize("writer", [_write_csv, _write_parquet])
def test_row_files_with_a_template_equal_the_same_rows_as_jsonl_text(tmp_path, tokenizer, writer) -> None:
    """A CSV or Parquet file with a column template gives the same token ids, in the same seeded order,
    as JSONL rows holding the rendered text: only the reader differs."""
    rows = _rows(23, seed=3)
    table = writer(tmp_path / f"rows{'.csv' if writer is _write_csv else '.parquet'}", rows)
    reference = tmp_path / "rows.jsonl"
    reference.write_text("".join(json.dumps({"text": f"{r['problem']}\n{r['solution']}"}) + "\n" for r in rows))
    options = DataOptions(sample_format="{problem}\n{solution}", heldout=5, max_samples=10, seed=4)
    got, got_heldout = load_domain("d", [table], tokenizer, options)
    want, want_heldout = load_domain("d", [reference], tokenizer, options.model_copy(update={"sample_format": "auto"}))
    assert [s.tolist() for s in got.samples] == [s.tolist() for s in want.samples]
    assert [s.tolist() for s in got_heldout.samples] == [s.tolist() for s in want_heldout.samples]
    assert got.report["inputs"] == [{"file": str(table), "rows": 23}]
    assert (got.report["samples"], got.report["heldout"], got.report["calibration"]) == (23, 5, 10)
    if writer is _write_csv:  # the header is line 1: row i starts on line i + 2
        assert [s.line - 2 for s in got.sources] == [int(t.split("row")[-1]) for t in _decoded(got, tokenizer)]
    else:
        assert [s.row for s in got.sources] == [int(t.split("row")[-1]) for t in _decoded(got, tokenizer)]


def test_csv_messages_cell_is_a_chat_and_multiline_cells_keep_their_line(tmp_path, tokenizer) -> None:
    path = tmp_path / "chats.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages", "note"])
        writer.writerow([json.dumps(chat(1)), "one\ntwo lines"])
        writer.writerow([json.dumps(chat(2)), "x\x0cy\u2028z"])  # not line breaks in a CSV file
    calibration, _ = load_domain("d", [path], tokenizer)
    expected = [tokenizer.apply_chat_template(chat(i), tokenize=True, return_dict=False) for i in (1, 2)]
    by_line = {s.line: ids.tolist() for s, ids in zip(calibration.sources, calibration.samples, strict=True)}
    assert by_line == {2: expected[0], 4: expected[1]}


def test_row_format_errors_name_file_row_and_column(tmp_path, tokenizer) -> None:
    table = _write_parquet(tmp_path / "t.parquet", [{"problem": "the cat", "answer": None}])
    with pytest.raises(DataError, match=rf"{table} row 0: the sample template names column 'solution'.*'problem'"):
        load_domain("d", [table], tokenizer, DataOptions(sample_format="{problem} {solution}"))
    with pytest.raises(DataError, match=rf"{table} row 0: column 'answer' is empty"):
        load_domain("d", [table], tokenizer, DataOptions(sample_format="{problem} {answer}"))
    with pytest.raises(DataError, match=rf"{table} row 0: row has neither 'messages' nor 'text'"):
        load_domain("d", [table], tokenizer)
    rows = tmp_path / "r.csv"
    rows.write_text("text,messages\nthe cat,not json\n")
    with pytest.raises(DataError, match=rf"{rows}:2: the messages cell is not JSON"):
        load_domain("d", [rows], tokenizer)
    text_only, _ = load_domain("d", [rows], tokenizer, DataOptions(sample_format="text"))
    assert _decoded(text_only, tokenizer) == ["the cat"]
    with pytest.raises(DataError, match=r"a \.txt file is text, not rows"):
        (tmp_path / "a.txt").write_text("the cat")
        load_domain("d", [DataSpec(path=str(tmp_path / "a.txt"), sample="text")], tokenizer)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_domain("d", [tmp_path / "bad.parquet"], tokenizer)


def test_a_source_sample_format_wins_over_the_options(tmp_path, tokenizer) -> None:
    table = _write_parquet(tmp_path / "t.parquet", _rows(4))
    spec = DataSpec(path=str(table), sample="{solution}")
    calibration, _ = load_domain("d", [spec], tokenizer, DataOptions(sample_format="{problem}"))
    assert sorted(_decoded(calibration, tokenizer)) == [f"row{i}" for i in range(4)]


def test_sample_format_is_checked_where_it_is_given() -> None:
    with pytest.raises(ValueError, match="sample format 'problem'"):
        DataOptions(sample_format="problem")
    with pytest.raises(ValueError, match="unmatched"):
        DataOptions(sample_format="{problem")
    with pytest.raises(ValueError, match="exactly one of path"):
        DataSpec.model_validate({"path": "a.csv", "dataset": "org/d"})
    with pytest.raises(ValueError, match="apply to Hub datasets"):
        DataSpec.model_validate({"path": "a.csv", "split": "test"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/math", DataSpec(dataset="org/math")),
        ("org/math:train[:2000]", DataSpec(dataset="org/math", split="train[:2000]")),
        ("org/math:main:test", DataSpec(dataset="org/math", config="main", split="test")),
        (
            "org/m@v1.2:cfg:train[10%:20%]+test",
            DataSpec(dataset="org/m", revision="v1.2", config="cfg", split="train[10%:20%]+test"),
        ),
        ("corpus.parquet", DataSpec(path="corpus.parquet")),
        ("nested/corpus.csv", DataSpec(path="nested/corpus.csv")),
    ],
)
def test_data_source_strings(text: str, expected: DataSpec) -> None:
    assert parse_data_source(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("org/math:", "empty config or split"),
        ("org/math::train", "empty config or split"),
        ("org/math:a:b:c", "at most two ':'"),
        ("org/math@:train", "empty revision"),
        ("org/math:train[:2", "split 'train[:2'"),
        ("my data/x", "not a Hub dataset repo id"),
        ("org--x/math", "not a Hub dataset repo id"),
    ],
)
def test_bad_data_source_strings_are_one_line_errors(text: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_data_source(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


_NAME = st.from_regex(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,20}[A-Za-z0-9_])?", fullmatch=True).filter(
    lambda s: ".." not in s and "--" not in s and not s.endswith(".git")
)
_REPO = st.builds(lambda a, b: f"{a}/{b}", _NAME, _NAME)
_REVISION = st.from_regex(r"[A-Za-z0-9_./-]{1,20}", fullmatch=True)
_SPLIT = st.from_regex(r"(train|test|validation)(\[(-?\d{1,4}%?)?:(-?\d{1,4}%?)?\])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(repo=_REPO, revision=st.none() | _REVISION, config=st.none() | _NAME, split=_SPLIT)
def test_dataset_spec_round_trips_through_its_string(repo, revision, config, split) -> None:
    spec = DataSpec(dataset=repo, revision=revision, config=config, split=split)
    assert parse_data_source(str(spec)) == spec


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_data_source_parser_gives_a_spec_or_a_spec_error(text: str) -> None:
    """Any string: a DataSpec whose string parses back to it, or a one-line SpecError; nothing else."""
    try:
        spec = parse_data_source(text)
    except SpecError as err:
        assert str(err)
        return
    assert parse_data_source(str(spec)) == spec


@settings(max_examples=300, deadline=None)
@given(repo=_REPO, revision=st.none() | _REVISION)
def test_model_ref_round_trips_and_is_a_valid_hub_id(repo, revision) -> None:
    """Every id the parser accepts is one huggingface_hub accepts too, and str() gives the text back."""
    from huggingface_hub.utils import validate_repo_id

    text = f"{repo}@{revision}" if revision else repo
    ref = parse_model_ref(text)
    assert ref == ModelRef(repo, revision) and str(ref) == text
    validate_repo_id(ref.repo_id)
    assert is_hub_ref(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_model_ref_parser_accepts_only_what_huggingface_hub_accepts(text: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        ref = parse_model_ref(text)
    except HubError as err:
        assert text in str(err)
        return
    try:
        validate_repo_id(ref.repo_id)
    except HFValidationError as err:
        raise AssertionError(f"{text!r} parsed to {ref} but huggingface_hub refuses it: {err}") from err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("org/m@v1", "org/m@v1"),
        ({"model": {"path": "org/m", "revision": "v1"}}, "org/m@v1"),
        ({"model": {"path": "org/m"}, "lora": None}, "org/m"),
        ({"model": "org/m@v2"}, "org/m@v2"),
        ({"path": "org/m", "revision": "abc"}, "org/m@abc"),
    ],
)
def test_mergekit_model_spellings(value, expected: str) -> None:
    assert model_ref_text(value) == expected


def test_mergekit_lora_and_bad_refs_are_refused() -> None:
    with pytest.raises(ValueError, match="LoRA"):
        model_ref_text({"model": {"path": "org/m"}, "lora": {"path": "org/adapter"}})
    with pytest.raises(HubError, match="LoRA"):
        parse_model_ref("org/m+org/adapter")
    with pytest.raises(HubError, match="revision after '@'"):
        parse_model_ref("org/m@")
    assert not is_hub_ref("base") and not is_hub_ref("/abs/folder") and not is_hub_ref("./org/m")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(min_size=1), _NAME.map(lambda c: (c,)))))
def test_template_pieces_round_trip(pieces) -> None:
    """A template written from literal text (braces doubled) and {column} fields parses back to the same pieces."""
    template = "".join(
        p.replace("{", "{{").replace("}", "}}") if isinstance(p, str) else "{" + p[0] + "}" for p in pieces
    )
    parsed = parse_template(template)
    merged: list = []
    for piece in parsed:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    expected: list = []
    for piece in pieces:
        if isinstance(piece, str) and expected and isinstance(expected[-1], str):
            expected[-1] += piece
        else:
            expected.append(piece)
    assert merged == expected


def test_missing_optional_libraries_name_the_extra(tmp_path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the `datasets` extra, a Hub dataset or a Parquet file stops with the install command."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"^org/math:train: .*pip install 'moemerge\[datasets\]'"):
        load_domain("d", ["org/math:train"], tokenizer)
    table = tmp_path / "t.parquet"
    table.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=rf"^{table}: Parquet .*pip install 'moemerge\[datasets\]'"):
        load_domain("d", [table], tokenizer)
