"""Reading one data source into raw samples, each remembering where it came from.

Formats (a row is one sample; how it becomes text is its sample format, see `moemerge.data.spec`):

- ``.jsonl``: one JSON object per line (blank lines ignored); ``.json``: one JSON array of such
  objects, a row's line being the line where it starts;
- ``.csv``: a header line, then one row per record (its line is where the record starts); a
  ``messages`` cell holds the chat as JSON text;
- ``.parquet`` (needs pyarrow, from the ``datasets`` extra): one row per record, by 0-based row;
- a Hub dataset split, loaded with the ``datasets`` library (the optional ``datasets`` extra) at
  one commit resolved first, so the report names exactly what was read;
- ``.txt``: text, not rows: the whole file is one sample, or one per paragraph.

The optional libraries are imported inside functions: importing moemerge.data stays cheap.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moemerge.data.spec import FILE_SUFFIXES, DataSpec, parse_template

EXTRA_HINT = "pip install 'moemerge[datasets]'"


class DataError(ValueError):
    """Calibration data that cannot be used; the message names the file (or dataset) and line (or row)."""


@dataclass(frozen=True)
class SampleSource:
    """Where a sample came from: a file and the 1-based line where it starts, or a file or Hub dataset split
    and its 0-based row."""

    path: Path | str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else f"{self.path} row {self.row}"


@dataclass(frozen=True)
class RawSample:
    """One sample before tokenisation: plain text, or a chat to render with the chat template."""

    source: SampleSource
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class SourceRead:
    """A data source's samples, and the record of what was read (for the calibration report)."""

    samples: list[RawSample]
    record: dict[str, Any] = field(default_factory=dict)


def read_source(spec: DataSpec, sample_format: str, split_paragraphs: bool = False) -> SourceRead:
    """Every row of one data source as a sample, in file (or split) order."""
    fmt = spec.sample or sample_format
    if spec.dataset is not None:
        return _read_dataset(spec, fmt)
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if spec.sample is not None:
            raise DataError(f"{path}: a .txt file is text, not rows; a sample format applies to row files")
        samples = _read_txt(path, split_paragraphs)
    elif suffix in _ROW_READERS:
        samples = _ROW_READERS[suffix](path, fmt)
    else:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")
    return SourceRead(samples, {"file": str(path), "rows": len(samples)})


def identity(spec: DataSpec) -> bytes:
    """What a source's samples depend on, for resume fingerprints: a file's bytes, or a dataset's commit."""
    if spec.dataset is None:
        return Path(spec.path).read_bytes() + (spec.sample or "").encode()
    return json.dumps([spec.model_dump(), _dataset_commit(spec)]).encode()


def _read_jsonl(path: Path, sample_format: str) -> list[RawSample]:
    samples = []
    with path.open("rb") as f:  # binary: lines split on b"\n" only, so line numbers match editors
        for line_no, raw_line in enumerate(f, start=1):
            source = SampleSource(path, line_no)
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{source}: not UTF-8 ({err.reason} at byte {err.start})") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{source}: invalid JSON: {err.msg} (column {err.colno})") from err
            samples.append(row_sample(row, source, sample_format))
    return samples


def _read_json(path: Path, sample_format: str) -> list[RawSample]:
    text = _read_text(path)
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    lines = _LineCounter(text)

    def invalid(err: json.JSONDecodeError) -> DataError:
        return DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})")

    pos = whitespace.match(text, 0).end()
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{lines.at(pos)}: a .json file must hold one array of rows")
    pos = whitespace.match(text, pos + 1).end()
    samples = []
    if text.startswith("]", pos):
        end = pos + 1
    else:
        while True:
            try:
                row, pos_after = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise invalid(err) from err
            samples.append(row_sample(row, SampleSource(path, lines.at(pos)), sample_format))
            pos = whitespace.match(text, pos_after).end()
            if text.startswith(",", pos):
                pos = whitespace.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                end = pos + 1
                break
            else:
                raise invalid(json.JSONDecodeError("Expecting ',' or ']'", text, pos))
    if whitespace.match(text, end).end() != len(text):
        raise invalid(json.JSONDecodeError("Extra data after the array", text, end))
    return samples


def _read_txt(path: Path, split_paragraphs: bool) -> list[RawSample]:
    text = _read_text(path)
    if not split_paragraphs:
        return [RawSample(SampleSource(path, 1), text=text)]
    samples: list[RawSample] = []
    paragraph: list[str] = []
    first_line = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            if not paragraph:
                first_line = line_no
            paragraph.append(line)
        elif paragraph:
            samples.append(RawSample(SampleSource(path, first_line), text="\n".join(paragraph)))
            paragraph = []
    if paragraph:
        samples.append(RawSample(SampleSource(path, first_line), text="\n".join(paragraph)))
    return samples


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({err.reason})") from err


class _LineCounter:
    """1-based line of increasing offsets into a text, without rescanning from the start each time."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_csv(path: Path, sample_format: str) -> list[RawSample]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))  # newline="": csv sees cells' own newlines
    samples = []
    try:
        if reader.fieldnames is None:  # an empty file
            return samples
        line = reader.line_num + 1  # where the first record starts, after the header
        for row in reader:
            source = SampleSource(path, line)
            line = reader.line_num + 1
            if None in row:
                raise DataError(f"{source}: more cells than the header has columns")
            if sample_format in ("auto", "messages") and isinstance(row.get("messages"), str):
                try:
                    row["messages"] = json.loads(row["messages"])
                except json.JSONDecodeError as err:
                    raise DataError(f"{source}: the messages cell is not JSON ({err.msg})") from err
            samples.append(row_sample(row, source, sample_format))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV ({err})") from err
    return samples


def _read_parquet(path: Path, sample_format: str) -> list[RawSample]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(f"{path}: Parquet files are read with pyarrow, an optional extra: {EXTRA_HINT}") from err
    try:
        table = pq.ParquetFile(path)
        rows = (row for batch in table.iter_batches(batch_size=1024) for row in batch.to_pylist())
        return [row_sample(row, SampleSource(path, row=i), sample_format) for i, row in enumerate(rows)]
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())})") from err


_DATASET_COMMITS: dict[tuple[str, str | None], str] = {}
"""Each dataset revision resolves once per process, so what is read and what is fingerprinted agree."""


def _dataset_commit(spec: DataSpec) -> str:
    from huggingface_hub import HfApi, errors, is_offline_mode

    key = (spec.dataset, spec.revision)
    if key not in _DATASET_COMMITS:
        try:
            revision = HfApi().resolve_revision(
                spec.dataset, repo_type="dataset", revision=spec.revision, local_files_only=is_offline_mode()
            )
        except errors.RepositoryNotFoundError as err:
            raise DataError(
                f"{spec}: no local file of that name, and no Hub dataset {spec.dataset} "
                "(if it is private, log in with `hf auth login` or set HF_TOKEN)"
            ) from err
        except errors.RevisionNotFoundError as err:
            raise DataError(f"{spec}: Hub dataset {spec.dataset} has no revision {spec.revision!r}") from err
        except (errors.RevisionResolutionError, errors.HfHubHTTPError, OSError) as err:
            raise DataError(f"{spec}: cannot resolve the dataset's revision ({' '.join(str(err).split())})") from err
        _DATASET_COMMITS[key] = revision.resolved
    return _DATASET_COMMITS[key]


def _read_dataset(spec: DataSpec, sample_format: str) -> SourceRead:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{spec}: Hub datasets are read with the `datasets` library, an optional extra: {EXTRA_HINT}"
        ) from err
    commit = _dataset_commit(spec)
    try:
        rows = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, revision=commit)
    except (ValueError, FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"{spec}: {' '.join(str(err).split())}") from err
    where = f"{spec.dataset}@{commit[:12]}" + (f":{spec.config}" if spec.config else "") + f":{spec.split}"
    samples = [row_sample(row, SampleSource(where, row=i), sample_format) for i, row in enumerate(rows)]
    record = {
        "dataset": spec.dataset,
        "config": spec.config,
        "split": spec.split,
        "revision": spec.revision,
        "commit": commit,
        "rows": len(samples),
    }
    return SourceRead(samples, record)


def row_sample(row: Any, source: SampleSource, sample_format: str) -> RawSample:
    """One row as a sample by the sample format: auto, messages, text, or a template over its columns."""
    if not isinstance(row, dict):
        got = type(row).__name__
        raise DataError(f"{source}: expected a JSON object (a row of named columns), got {got}")
    if sample_format not in ("auto", "messages", "text"):
        return RawSample(source, text=_render_template(sample_format, row, source))
    if "messages" in row and sample_format != "text":
        return RawSample(source, messages=_check_messages(row["messages"], source))
    if "text" in row and sample_format != "messages":
        if not isinstance(row["text"], str):
            raise DataError(f"{source}: 'text' must be a string, got {type(row['text']).__name__}")
        return RawSample(source, text=row["text"])
    keys = ", ".join(repr(k) for k in row) or "none"
    wanted = {"auto": "neither 'messages' nor 'text'", "messages": "no 'messages'", "text": "no 'text'"}[sample_format]
    raise DataError(
        f"{source}: row has {wanted} (keys: {keys}); set a sample format such as '{{problem}}\\n{{solution}}'"
    )


def _render_template(template: str, row: dict[str, Any], source: SampleSource) -> str:
    out = []
    for piece in parse_template(template):
        if isinstance(piece, str):
            out.append(piece)
            continue
        (column,) = piece
        if column not in row:
            keys = ", ".join(repr(k) for k in row) or "none"
            raise DataError(
                f"{source}: the sample template names column {column!r}, which the row lacks (keys: {keys})"
            )
        value = row[column]
        if isinstance(value, bool | int | float | str):
            out.append(str(value))
        elif value is None:
            raise DataError(f"{source}: column {column!r} is empty (null)")
        else:
            raise DataError(f"{source}: column {column!r} holds a {type(value).__name__}, not text")
    return "".join(out)


_ROW_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _check_messages(messages: Any, source: SampleSource) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, message in enumerate(messages):
        where = f"{source}: messages[{k}]"
        if not isinstance(message, dict):
            got = type(message).__name__
            raise DataError(f"{where} must be an object with 'role' and 'content', got {got}")
        if not isinstance(message.get("role"), str):
            raise DataError(f"{where} needs a string 'role'")
        if "content" not in message:
            raise DataError(f"{where} has no 'content'")
        if not isinstance(message["content"], str | list | None):
            raise DataError(f"{where}: 'content' must be a string or a list of parts")
    return messages
