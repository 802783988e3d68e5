"""Atomic sharded safetensors writer: nothing appears at the target until all of it is written.

Tensors are written under the names they are given (the caller passes on-disk names, so the
input's layout, per-expert or fused, is kept), in shards of at most `max_shard_bytes`. Everything
goes to a hidden temporary folder next to the target, which is renamed into place by `finalize`;
any exception removes the temporary folder, so a failed run never leaves a half-written model.

A write the disk refuses (full disk, quota, file-size limit) is a one-line `CheckpointError`
naming the output, not the safetensors library's traceback. A resumable writer (`resume_key`)
keeps its folder under a name derived from the key instead of a random one: a run that is killed
(or interrupted with Ctrl-C, or loses a torchrun rank) leaves it, and the next run with the same
key adopts the shards it finished (merge/distributed.py); an error in the inputs still removes it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.checkpoint.reader import INDEX_FILE, SINGLE_FILE, CheckpointError

if TYPE_CHECKING:
    import torch

SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied beside the weights so the output loads like its source (config, tokenizer, template)."""

DEFAULT_SHARD_BYTES = 2 * 1024**3


def shard_file_name(index: int) -> str:
    """Temporary name of shard ``index`` inside the writer's folder (renamed by `finalize`)."""
    return f"shard-{index:05d}.safetensors"


@contextmanager
def disk_errors(out_dir: Path, outcome: str = "the output was not written") -> Iterator[None]:
    """Turn a write the disk refuses into a one-line CheckpointError naming `out_dir` (and the `outcome`)."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
    except SafetensorError as err:  # the Rust writer reports I/O failures as "... I/O error: <reason>"
        if "I/O error" not in str(err):
            raise
        reason = str(err).split("I/O error:", 1)[1].strip().split(" (os error")[0]
    else:
        return
    raise CheckpointError(f"{out_dir}: writing failed ({reason}); {outcome}") from None


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard under a temporary name, then rename it: `path` exists only when complete.

    The bytes depend on the tensors alone, whichever process writes them.
    """
    from safetensors.torch import save_file

    partial = path.with_name(path.name + ".part")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.rename(path)


class CheckpointWriter:
    """Collects tensors into shards in a temporary folder; `finalize` moves the folder into place."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        resume_key: str | None = None,
    ):
        """`resume_key`: keep the folder for a rerun with the same key (the caller holds `folder_lock(out_dir)`)."""
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(f"{self.out_dir}: output exists; pass overwrite to replace it")
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.resumable = resume_key is not None
        self._keep = False
        if resume_key is None:
            self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        else:
            self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{resume_key[:16]}"
            for other in self.out_dir.parent.glob(f".{self.out_dir.name}.partial-*"):
                if other != self.tmp_dir:  # a killed run of other inputs: its shards can never be used
                    shutil.rmtree(other, ignore_errors=True)
        with disk_errors(self.out_dir):
            self.tmp_dir.mkdir(parents=True, exist_ok=self.resumable)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._written: set[str] = set()

    @property
    def names(self) -> set[str]:
        return self._written | set(self._pending)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a full shard is written to disk and freed."""
        if name in self._written or name in self._pending:
            raise CheckpointError(f"{self.out_dir}: tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        path = self.tmp_dir / shard_file_name(len(self._shards))
        with disk_errors(self.out_dir):
            save_shard(self._pending, path)
        self._shards.append((path, list(self._pending)))
        self._written.update(self._pending)
        self._pending, self._pending_bytes = {}, 0

    def add_shard_file(self, path: Path, names: list[str]) -> None:
        """Adopt shard number ``len(shards)``, written by another process into `tmp_dir` with `save_shard`.

        Distributed stage 1: ranks write whole shards (the same tensors `add` would have put in
        them), rank 0 adopts them in order and finalizes, so the folder is the single-process one.
        """
        if self._pending:
            raise CheckpointError(f"{self.out_dir}: cannot adopt a shard file while tensors are pending")
        expected = self.tmp_dir / shard_file_name(len(self._shards))
        if path != expected or not path.is_file():
            raise CheckpointError(f"{self.out_dir}: shard file {path} missing or out of order (expected {expected})")
        twice = sorted(self.names & set(names))
        if twice:
            raise CheckpointError(f"{self.out_dir}: tensor {twice[0]} written twice")
        self._shards.append((path, list(names)))
        self._written.update(names)

    def copy_support_files(self, source_dir: str | Path) -> None:
        """Copy config, generation config, tokenizer files and chat template from `source_dir`."""
        for name in SUPPORT_FILES:
            path = Path(source_dir) / name
            if path.is_file():
                with disk_errors(self.out_dir):
                    shutil.copy2(path, self.tmp_dir / name)

    def write_text(self, name: str, text: str) -> None:
        with disk_errors(self.out_dir):
            (self.tmp_dir / name).write_text(text)

    def finalize(self, expected: set[str] | None = None) -> Path:
        """Write the last shard and the index, check completeness, move the folder into place."""
        if self._pending or not self._shards:
            self._flush()
        if expected is not None:
            missing = sorted(expected - self._written)
            if missing:
                raise CheckpointError(
                    f"{self.out_dir}: {len(missing)} tensors missing from the output, e.g. {missing[0]}"
                )
            extra = sorted(self._written - expected)
            if extra:
                raise CheckpointError(f"{self.out_dir}: unexpected tensors in the output, e.g. {extra[0]}")
        total = len(self._shards)
        weight_map, total_size = {}, 0
        for i, (path, names) in enumerate(self._shards):
            final = SINGLE_FILE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            path.rename(self.tmp_dir / final)
            total_size += (self.tmp_dir / final).stat().st_size
            weight_map.update(dict.fromkeys(names, final))
        if total > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            self.write_text(INDEX_FILE, json.dumps(index, indent=2) + "\n")
        self._move_into_place()
        return self.out_dir

    def _move_into_place(self) -> None:
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            self.out_dir.rename(old)
        self.tmp_dir.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def keep_for_resume(self) -> None:
        """Leave a resumable writer's folder in place when the error now propagating is not the inputs' fault."""
        self._keep = self.resumable

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)  # Ctrl-C, exit
        if self.resumable and (interrupted or self._keep):
            return  # the finished shards are kept for the rerun
        if self.tmp_dir.exists():  # finalize renamed it away; anything left is unfinished work
            self.abort()
