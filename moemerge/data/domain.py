"""Calibration and held-out text for one domain: reading, sample selection, tokenisation, batching.

HARC (docs/HARC.md, "Calibration activations") runs each source model's domain text through the merged
model and keeps every non-padding token. This module turns a domain's data sources into token ids:

1. **Read** every data source into samples (`moemerge.data.readers`: JSONL, JSON, CSV, Parquet and
   text files, Hub dataset splits), each remembering its file (or dataset) and line (or row). A row
   becomes a sample by its sample format (`moemerge.data.spec`): a ``messages`` chat, a ``text``
   column, or a template over named columns.

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

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moemerge.data.readers import DataError, RawSample, SampleSource, read_source
from moemerge.data.spec import DataSpec, check_sample_format, parse_data_source

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
# transformers stores a huge sentinel (int(1e30)) in model_max_length when a tokenizer declares none.
_UNDECLARED_MAX_LENGTH = 10**9
_TOKENIZE_CHUNK = 1024


class DataOptions(BaseModel):
    """How a domain's data sources become calibration and held-out samples (CLI flags and YAML schema)."""

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

    sample_format: str = Field(
        default="auto",
        description=(
            "How a row becomes a sample: auto (a 'messages' chat rendered with the chat template, else a 'text' "
            "column), messages, text, or a template over named columns such as '{problem}\\n{solution}' "
            "(a data source's own 'sample' wins)."
        ),
    )

    @field_validator("sample_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return check_sample_format(value)

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
class TokenizedDomain:
    """The token ids of one domain's calibration (or held-out) samples, in the seeded shuffle order."""

    name: str
    split: Literal["calibration", "heldout"]
    samples: list[Tensor]  # 1-D int64 token ids, one tensor per sample
    sources: list[SampleSource]  # sources[i] is where samples[i] came from
    report: dict[str, Any] = field(default_factory=dict)  # what was read and how many samples each split got

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


def load_domain(
    name: str,
    files: Sequence[str | Path | DataSpec],
    tokenizer: PreTrainedTokenizerBase,
    options: DataOptions | None = None,
) -> tuple[TokenizedDomain, TokenizedDomain | None]:
    """Read, select and tokenise one domain's data sources; returns (calibration, held-out or None).

    Both carry the same ``report``: each source read (file, or dataset id, config, split, revision and
    commit, with its row count), and the samples kept, dropped as empty, held out and calibrating.
    """
    options = options or DataOptions()
    if not files:
        raise DataError(f"domain {name!r}: no files given")
    specs = [parse_data_source(f) for f in files]
    reads = [read_source(spec, options.sample_format, options.txt_split_paragraphs) for spec in specs]
    raw = [sample for read in reads for sample in read.samples]
    listed = ", ".join(str(s) for s in specs)
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
    report = {
        "inputs": [read.record for read in reads],
        "samples": len(raw),
        "dropped_empty": len(blank),
        "heldout": len(heldout_ids),
        "calibration": len(calibration_ids),
    }
    max_length = _max_length(options, tokenizer)
    calibration = _tokenize(name, "calibration", [raw[i] for i in calibration_ids], tokenizer, max_length, report)
    heldout = None
    if heldout_ids:
        heldout = _tokenize(name, "heldout", [raw[i] for i in heldout_ids], tokenizer, max_length, report)
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
    raw: list[RawSample],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    report: dict[str, Any],
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
    return TokenizedDomain(name=name, split=split, samples=samples, sources=[s.source for s in raw], report=report)


def _render(sample: RawSample, tokenizer: PreTrainedTokenizerBase) -> str:
    if sample.messages is None:
        assert sample.text is not None
        return sample.text
    try:
        return tokenizer.apply_chat_template(sample.messages, tokenize=False)
    except Exception as err:  # jinja2 errors (e.g. raise_exception in the template) and ValueErrors
        raise DataError(f"{sample.source}: the chat template cannot render these messages: {err}") from err
