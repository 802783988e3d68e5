"""Calibration and held-out text for one domain: reading, sample selection, tokenisation, batching.

HARC (docs/HARC.md, "Calibration activations") runs each source model's domain text through the merged
model and keeps every non-padding token. This module turns a domain's files into token ids:

1. **Read** every file into samples, each remembering its file and 1-based line:

   - ``.jsonl``: one JSON object per line, with ``messages`` (a chat: a list of ``{role, content}``
     dicts, rendered with the tokenizer's chat template) or ``text`` (used as is). A row with both uses
     ``messages``. Blank lines are ignored.
   - ``.json``: one JSON array of such rows; a row's line is the line where it starts.
   - ``.txt``: the whole file is one sample (line 1), or, with ``DataOptions.txt_split_paragraphs``, one
     sample per paragraph (blocks separated by blank lines; the line is the paragraph's first line).

   ``text`` samples that are empty or only whitespace are dropped with a warning naming the count and
   the first of them; a domain left with no samples is an error.
2. **Select**: the samples are shuffled once with ``seed``; the held-out samples are the last ``heldout``
   of that order, the calibration samples the first ``max_samples`` of the rest. The two sets never
   share a sample, and changing ``heldout`` does not change which samples calibrate as long as enough
   remain.
3. **Tokenise** each selected sample once, keeping its first ``max_length`` tokens. A chat is rendered
   with ``apply_chat_template(messages, tokenize=False)`` and tokenised *without* the tokenizer's
   special tokens, since the template writes them itself (BOS, turn markers): the ids equal
   ``apply_chat_template(messages, tokenize=True)``. Plain text is tokenised *with* them (e.g. BOS), as
   the model sees text. Every token counts, prompt and response alike (no loss mask).
4. **Batch** (``batches``): samples sorted longest first, packed into right-padded batches of at most
   ``batch_tokens`` padded positions (B x T), so the first batch is the largest and memory problems show
   at once.

torch and transformers are imported inside functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt")
DEFAULT_MAX_LENGTH = 2048
# transformers stores a huge sentinel (int(1e30)) in model_max_length when a tokenizer declares none.
_UNDECLARED_MAX_LENGTH = 10**9
_TOKENIZE_CHUNK = 1024


class DataError(ValueError):
    """Calibration data that cannot be used; the message names the file and 1-based line."""


class DataOptions(BaseModel):
    """How a domain's files become calibration and held-out samples (CLI flags and YAML schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_samples: int | float | None = Field(
        default=None,
        description=(
            "Calibration samples per domain, taken after the seeded shuffle and after the held-out "
            "samples are set aside: a count (>= 1), or a fraction in (0, 1) of the samples left "
            "(rounded down, at least 1). None uses them all."
        ),
    )
    max_length: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Keep the first max_length tokens of each sample. None: the tokenizer's model_max_length "
            f"when it declares one, otherwise {DEFAULT_MAX_LENGTH}."
        ),
    )
    seed: int = Field(
        default=0,
        description="Seed of the one shuffle that picks held-out and calibration samples and their order.",
    )
    heldout: int | float = Field(
        default=0,
        description=(
            "Samples per domain reserved as held-out text for diagnostics, never used for calibration: "
            "a count (>= 0), or a fraction in (0, 1) of all samples (rounded down, at least 1). "
            "0 reserves none."
        ),
    )
    txt_split_paragraphs: bool = Field(
        default=False,
        description=(
            "Split .txt files into one sample per paragraph (blocks separated by blank lines) instead of "
            "one sample per file."
        ),
    )

    @field_validator("max_samples", "heldout", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a count or a fraction, got a boolean")
        return value

    @field_validator("max_samples")
    @classmethod
    def _check_max_samples(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(f"a fraction must be in (0, 1), got {value}; give a count as an integer")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a count must be >= 1, got {value}")
        return value

    @field_validator("heldout")
    @classmethod
    def _check_heldout(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(f"a fraction must be in (0, 1), got {value}; give a count as an integer")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a count must be >= 0, got {value}")
        return value


@dataclass(frozen=True)
class SampleSource:
    """Where a sample came from: its file and the 1-based line where it starts."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class TokenizedDomain:
    """The token ids of one domain's calibration (or held-out) samples, in the seeded shuffle order."""

    name: str
    split: Literal["calibration", "heldout"]
    samples: list[Tensor]  # 1-D int64 token ids, one tensor per sample
    sources: list[SampleSource]  # sources[i] is where samples[i] came from

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class Batch:
    """Right-padded samples: ``attention_mask`` is 1 on real tokens, 0 on padding."""

    input_ids: Tensor  # B x T, int64
    attention_mask: Tensor  # B x T, int64
    indices: list[int]  # row b holds domain.samples[indices[b]]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class _RawSample:
    source: SampleSource
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


def load_domain(
    name: str,
    files: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    options: DataOptions | None = None,
) -> tuple[TokenizedDomain, TokenizedDomain | None]:
    """Read, select and tokenise one domain's files; returns (calibration, held-out or None)."""
    options = options or DataOptions()
    if not files:
        raise DataError(f"domain {name!r}: no files given")
    paths = [Path(f) for f in files]
    raw = [sample for path in paths for sample in _read_file(path, options.txt_split_paragraphs)]
    listed = ", ".join(str(p) for p in paths)
    if not raw:
        raise DataError(f"domain {name!r}: no samples in {listed}")

    blank = [s for s in raw if s.text is not None and not s.text.strip()]
    if blank:
        logger.warning("domain %r: dropped %d empty text sample(s), the first at %s", name, len(blank), blank[0].source)
        raw = [s for s in raw if s.text is None or s.text.strip()]
        if not raw:
            raise DataError(f"domain {name!r}: every sample in {listed} is empty")

    first_chat = next((s for s in raw if s.messages is not None), None)
    if first_chat is not None and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{first_chat.source}: row has 'messages' but the tokenizer has no chat template; "
            "set one, or give the samples as 'text'"
        )

    heldout_ids, calibration_ids = _split(len(raw), options, name)
    max_length = _max_length(options, tokenizer)
    calibration = _tokenize(name, "calibration", [raw[i] for i in calibration_ids], tokenizer, max_length)
    heldout = None
    if heldout_ids:
        heldout = _tokenize(name, "heldout", [raw[i] for i in heldout_ids], tokenizer, max_length)
    return calibration, heldout


def pack(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Sample indices of each batch: longest first (ties by index), each batch as long as its first
    sample and holding at most ``batch_tokens`` positions (a longer sample is a batch of its own).

    The one packing rule, used by `batches` and by the memory planner that sizes them in advance.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packed, start = [], 0
    while start < len(order):
        rows = max(1, batch_tokens // lengths[order[start]])
        packed.append(order[start : start + rows])
        start += len(packed[-1])
    return packed


def batches(domain: TokenizedDomain, batch_tokens: int, pad_id: int) -> Iterator[Batch]:
    """Pack a domain's samples into right-padded batches of at most ``batch_tokens`` positions (B x T).

    Samples go longest first (ties by index), each batch as long as its first sample, so padding stays
    small and the order is deterministic. A sample longer than ``batch_tokens`` is a batch of its own.
    Every sample appears in exactly one batch.
    """
    import torch

    for indices in pack([len(sample) for sample in domain.samples], batch_tokens):
        width = len(domain.samples[indices[0]])
        input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            sample = domain.samples[i]
            input_ids[row, : len(sample)] = sample
            attention_mask[row, : len(sample)] = 1
        yield Batch(input_ids=input_ids, attention_mask=attention_mask, indices=indices)


def _read_file(path: Path, split_paragraphs: bool) -> list[_RawSample]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".txt":
        return _read_txt(path, split_paragraphs)
    raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")


def _read_jsonl(path: Path) -> list[_RawSample]:
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
            samples.append(_parse_row(row, source))
    return samples


def _read_json(path: Path) -> list[_RawSample]:
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
            samples.append(_parse_row(row, SampleSource(path, lines.at(pos))))
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


def _read_txt(path: Path, split_paragraphs: bool) -> list[_RawSample]:
    text = _read_text(path)
    if not split_paragraphs:
        return [_RawSample(SampleSource(path, 1), text=text)]
    samples: list[_RawSample] = []
    paragraph: list[str] = []
    first_line = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            if not paragraph:
                first_line = line_no
            paragraph.append(line)
        elif paragraph:
            samples.append(_RawSample(SampleSource(path, first_line), text="\n".join(paragraph)))
            paragraph = []
    if paragraph:
        samples.append(_RawSample(SampleSource(path, first_line), text="\n".join(paragraph)))
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


def _parse_row(row: Any, source: SampleSource) -> _RawSample:
    if not isinstance(row, dict):
        got = type(row).__name__
        raise DataError(f"{source}: expected a JSON object with 'messages' or 'text', got {got}")
    if "messages" in row:
        return _RawSample(source, messages=_check_messages(row["messages"], source))
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{source}: 'text' must be a string, got {type(row['text']).__name__}")
        return _RawSample(source, text=row["text"])
    keys = ", ".join(repr(k) for k in row) or "none"
    raise DataError(f"{source}: row has neither 'messages' nor 'text' (keys: {keys})")


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


def _count(value: int | float, n: int) -> int:
    """A count stays; a fraction of n rounds down (tolerating float error) to at least 1."""
    if isinstance(value, int):
        return value
    return max(1, math.floor(value * n + 1e-9))


def _split(n: int, options: DataOptions, name: str) -> tuple[list[int], list[int]]:
    """Seeded (held-out, calibration) sample indices: one shuffle, held-out from its end."""
    order = list(range(n))
    random.Random(options.seed).shuffle(order)
    n_heldout = _count(options.heldout, n) if options.heldout else 0
    if n_heldout >= n:
        raise DataError(
            f"domain {name!r}: heldout={options.heldout} reserves {n_heldout} of {n} samples, "
            "leaving none for calibration"
        )
    rest = order[: n - n_heldout]
    n_calibration = len(rest) if options.max_samples is None else _count(options.max_samples, len(rest))
    return order[n - n_heldout :], rest[:n_calibration]


def _max_length(options: DataOptions, tokenizer: PreTrainedTokenizerBase) -> int:
    if options.max_length is not None:
        return options.max_length
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < _UNDECLARED_MAX_LENGTH:
        return declared
    return DEFAULT_MAX_LENGTH


def _tokenize(
    name: str,
    split: Literal["calibration", "heldout"],
    raw: list[_RawSample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> TokenizedDomain:
    import torch

    texts = [_render(sample, tokenizer) for sample in raw]
    ids: list[list[int] | None] = [None] * len(raw)
    # Rendered chats carry the template's special tokens; plain text gets the tokenizer's own.
    for chat in (True, False):
        group = [i for i, sample in enumerate(raw) if (sample.messages is not None) == chat]
        for start in range(0, len(group), _TOKENIZE_CHUNK):
            chunk = group[start : start + _TOKENIZE_CHUNK]
            encoded = tokenizer(
                [texts[i] for i in chunk],
                add_special_tokens=not chat,
                truncation=True,
                max_length=max_length,
                return_attention_mask=False,
            )["input_ids"]
            for i, sample_ids in zip(chunk, encoded, strict=True):
                ids[i] = sample_ids
    samples = []
    for sample, sample_ids in zip(raw, ids, strict=True):
        if not sample_ids:
            raise DataError(f"{sample.source}: sample has no tokens")
        samples.append(torch.tensor(sample_ids, dtype=torch.long))
    return TokenizedDomain(name=name, split=split, samples=samples, sources=[s.source for s in raw])


def _render(sample: _RawSample, tokenizer: PreTrainedTokenizerBase) -> str:
    if sample.messages is None:
        assert sample.text is not None
        return sample.text
    try:
        return tokenizer.apply_chat_template(sample.messages, tokenize=False)
    except Exception as err:  # jinja2 errors (e.g. raise_exception in the template) and ValueErrors
        raise DataError(f"{sample.source}: the chat template cannot render these messages: {err}") from err
