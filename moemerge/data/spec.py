"""Where a domain's text comes from (a file, or a Hub dataset split) and how a row becomes a sample.

A data source is written as a string, on the CLI (``--data SOURCE=SPEC``) and in a recipe's
``calibrate.domains`` lists, or as a mapping in the recipe (`DataSpec`'s fields):

- a local file (``.jsonl``, ``.json``, ``.txt``, ``.parquet``, ``.csv``): an existing file wins,
  and a name with one of these suffixes is always a file;
- otherwise a Hub dataset: ``REPO[@REVISION][:CONFIG][:SPLIT]``, e.g. ``openai/gsm8k:main:train[:2000]``.
  The split takes the `datasets` library's syntax (``train``, ``train[:2000]``, ``train[10%:20%]``,
  ``train+test``) and defaults to ``train``; a colon inside the brackets belongs to the slice.

A row becomes a sample by its ``sample`` format (the source's own, else `DataOptions.sample_format`):
``auto`` (a ``messages`` column rendered with the chat template, else a ``text`` column), ``messages``,
``text``, or a template over named columns such as ``"{problem}\\n{solution}"`` (``{{`` and ``}}``
are literal braces).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moemerge.checkpoint.hub import REPO_ID

FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")
SAMPLE_FORMATS = ("auto", "messages", "text")
_SPLIT = re.compile(r"\w+(?:\.\w+)*(?:\[[^\[\]]*\])?(?:\+\w+(?:\.\w+)*(?:\[[^\[\]]*\])?)*")
_REVISION = re.compile(r"[^\s@:+\[\]]+")
_CONFIG = re.compile(r"[^\s@:\[\]]+")
_TEMPLATE_PIECE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]|[^{}]+")


class SpecError(ValueError):
    """A data source or sample format that cannot be parsed; the message quotes it."""


def parse_template(template: str) -> list[str | tuple[str]]:
    """Literal text as str, a ``{column}`` field as a 1-tuple; ``{{`` / ``}}`` are literal braces."""
    pieces: list[str | tuple[str]] = []
    for match in _TEMPLATE_PIECE.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append(token[0])
        elif match.group(1) is not None:
            column = match.group(1)
            if not column.strip():
                raise SpecError(f"sample template {template!r}: an empty {{}} names no column")
            pieces.append((column,))
        elif token in ("{", "}"):
            raise SpecError(f"sample template {template!r}: unmatched {token!r} (write {token * 2} for a literal one)")
        else:
            pieces.append(token)
    return pieces


def check_sample_format(value: str) -> str:
    """``auto``, ``messages``, ``text``, or a template naming at least one column."""
    if value in SAMPLE_FORMATS:
        return value
    if not any(isinstance(p, tuple) for p in parse_template(value)):
        raise SpecError(
            f"sample format {value!r}: use auto, messages, text, or a template over columns such as '{{problem}}'"
        )
    return value


class DataSpec(BaseModel):
    """One data source of a domain: a local file, or a split of a Hub dataset; and its row format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(default=None, description="A local .jsonl, .json, .txt, .parquet or .csv file.")
    dataset: str | None = Field(default=None, description="A Hub dataset repo id, e.g. openai/gsm8k.")
    config: str | None = Field(default=None, description="The dataset's configuration (subset), if it has several.")
    split: str = Field(default="train", description="Split with optional slice, e.g. train[:2000] or train[10%:20%].")
    revision: str | None = Field(default=None, description="Branch, tag or commit of the dataset repo.")
    sample: str | None = Field(
        default=None,
        description="How a row becomes a sample (auto, messages, text, or a template); None: sample_format.",
    )

    @field_validator("sample")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return None if value is None else check_sample_format(value)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.dataset is None):
            raise SpecError("a data source names exactly one of path (a local file) or dataset (a Hub dataset)")
        if self.path is not None:
            if self.config is not None or self.revision is not None or self.split != "train":
                raise SpecError(f"{self.path}: config, split and revision apply to Hub datasets, not to files")
            return self
        if not REPO_ID.fullmatch(self.dataset) or "--" in self.dataset or ".." in self.dataset:
            raise SpecError(f"{self.dataset}: not a Hub dataset repo id (org/name)")
        if not _SPLIT.fullmatch(self.split):
            raise SpecError(f"{self.dataset}: split {self.split!r} is not a split name with an optional [slice]")
        if self.revision is not None and not _REVISION.fullmatch(self.revision):
            raise SpecError(f"{self.dataset}: revision {self.revision!r} must be a branch, tag or commit")
        if self.config is not None and not _CONFIG.fullmatch(self.config):
            raise SpecError(f"{self.dataset}: config {self.config!r} has a space, '@', ':' or a bracket")
        return self

    def under(self, root: Path) -> DataSpec:
        """A relative file path that exists under `root` (a recipe's folder) made absolute."""
        if self.path is None or Path(self.path).is_absolute() or not (root / self.path).exists():
            return self
        return self.model_copy(update={"path": str((root / self.path).resolve())})

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return (
            self.dataset
            + (f"@{self.revision}" if self.revision else "")
            + (f":{self.config}" if self.config else "")
            + f":{self.split}"
        )


def parse_data_source(value: str | Path | dict[str, Any] | DataSpec) -> DataSpec:
    """A data source from its string form (module docstring), its mapping form, or as it is."""
    if isinstance(value, DataSpec):
        return value
    if isinstance(value, Path):
        return DataSpec(path=str(value))
    try:
        if isinstance(value, dict):
            return DataSpec.model_validate(value)
        if not isinstance(value, str):
            raise SpecError(f"a data source is a string or a mapping, got {type(value).__name__}")
        if Path(value).exists() or Path(value).suffix.lower() in FILE_SUFFIXES:
            return DataSpec(path=value)
        head, *parts = _split_outside_brackets(value)
        repo, at, revision = head.partition("@")
        if len(parts) > 2:
            raise SpecError(f"{value}: expected DATASET[@REVISION][:CONFIG][:SPLIT] (at most two ':' outside [ ])")
        config, split = parts if len(parts) == 2 else (None, *(parts or ["train"]))
        if at and not revision:
            raise SpecError(f"{value}: an empty revision after '@'")
        if not split or config == "":
            raise SpecError(f"{value}: an empty config or split between ':'")
        return DataSpec(dataset=repo, revision=revision or None, config=config, split=split)
    except ValueError as err:  # pydantic wraps the SpecErrors of the validators
        message = err.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(err, "errors") else str(err)
        raise SpecError(message) from None


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == ":" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]
