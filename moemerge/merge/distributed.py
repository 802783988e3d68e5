"""Stage 1 in whole output shards, on one rank or many (torchrun); the output is the same, byte for byte.

The single-process writer packs tensors, in the reference's name order, into shards of at most
``max_shard_bytes``; which tensor lands in which shard depends only on the output sizes, and
those are known from the headers (shape, and the output dtype or the reference's integer dtype).
So every rank computes the same shard layout (:func:`plan_shards`), merges the shards assigned
to it (balanced by bytes) with the same `merge_tensors` loop, and writes each complete shard
with the same `save_shard` call into rank 0's temporary folder; rank 0 then adopts the shards in
order, writes config, tokenizer, model card and index, and moves the folder into place. A
safetensors file's bytes depend on its tensors alone, so the output equals a single-process
merge byte for byte (tests/test_distributed.py). No tensor crosses the network; the output
folder must be on a file system every rank can write (the inputs are read by every rank).

If any rank fails, every rank raises and rank 0 removes the temporary folder: the output is
either complete or absent. A single process is the same code with one rank (merge/driver.py).

Resume: every shard is written under a temporary name and renamed when complete, into a folder
named after the run's inputs (`resume_key`), which a killed run leaves behind; the rerun merges
only the shards not there yet, so its output is the uninterrupted one byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.checkpoint.reader import CheckpointError, read_header
from moemerge.checkpoint.writer import CheckpointWriter, disk_errors, save_shard, shard_file_name
from moemerge.distributed import RankFailure, Ranks, assign_shards, init_ranks
from moemerge.merge.plan import MergeError, MergePlan
from moemerge.merge.tensors import merge_tensors

if TYPE_CHECKING:
    import torch

_ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_OUTPUT_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def output_bytes(plan: MergePlan, name: str) -> int:
    """Bytes of the output tensor `name` (as `merge_tensor` returns it), from headers alone."""
    model = plan.copy_from.get(name, plan.reference)
    info = plan.readers[model].info(name)
    code = _OUTPUT_CODES[plan.recipe.output_dtype] if info.dtype.startswith(("F", "BF")) else info.dtype
    return math.prod(info.shape) * _ITEM_BYTES[code]


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """The names of each shard, exactly as `CheckpointWriter.add` packs (name, bytes) in this order."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current or not shards:
        shards.append(current)
    return shards


class _ShardFiles:
    """A stand-in writer for `merge_tensors`: collects each planned shard and saves it once complete."""

    def __init__(self, tmp_dir: Path, shards: dict[int, list[str]], expected_bytes: dict[str, int]):
        self.tmp_dir = tmp_dir
        self.shard_of = {name: k for k, names in shards.items() for name in names}
        self.shards = shards
        self.expected_bytes = expected_bytes
        self.pending: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != self.expected_bytes[name]:
            raise MergeError(
                f"tensor {name}: merged to {nbytes} bytes but {self.expected_bytes[name]} were planned from the "
                "headers; the distributed shard layout would differ from a single-process merge"
            )
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        k = self.shard_of[name]
        if len(self.pending) == len(self.shards[k]):
            save_shard(self.pending, self.tmp_dir / shard_file_name(k))
            self.pending = {}


def _finished(path: Path, names: list[str]) -> bool:
    """Whether an earlier run of the same inputs left shard `path` complete (shards appear by rename only)."""
    try:
        return path.is_file() and set(read_header(path)) == set(names)
    except CheckpointError:
        return False


def merge_sharded(
    plan: MergePlan,
    out_dir: Path,
    finish: Callable[[CheckpointWriter], None],
    *,
    overwrite: bool,
    device: str,
    max_shard_bytes: int,
    progress: bool,
    resume_key: str | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Merge `plan` into `out_dir`, on one process or on every rank of a torchrun job; `finish(writer)` adds the
    support files.

    Every rank calls this with the same plan; every rank returns `out_dir` or raises. With
    `resume_key` (which must change whenever the inputs or the recipe do) the shards a killed run
    finished are kept under that key and not merged again.
    """
    ranks = ranks or init_ranks(device)
    sizes = [(name, output_bytes(plan, name)) for name in plan.names]
    shards = plan_shards(sizes, max_shard_bytes)
    shard_bytes = [sum(dict(sizes)[n] for n in names) for names in shards]
    mine = assign_shards(shard_bytes, ranks.world_size)[ranks.rank] if ranks.distributed else range(len(shards))
    settings = {"overwrite": overwrite, "max_shard_bytes": max_shard_bytes, "resume_key": resume_key}
    with CheckpointWriter(out_dir, **settings) if ranks.is_writer else nullcontext() as writer:
        try:
            return _merge_and_finalize(plan, ranks, writer, mine, shards, dict(sizes), out_dir, finish, progress)
        except RankFailure:  # a rank died, not the inputs' fault: the rerun (or torchrun's restart) resumes
            if writer is not None:
                writer.keep_for_resume()
            raise


def _merge_and_finalize(
    plan: MergePlan,
    ranks: Ranks,
    writer: CheckpointWriter | None,
    mine: Sequence[int],
    shards: list[list[str]],
    sizes: dict[str, int],
    out_dir: Path,
    finish: Callable[[CheckpointWriter], None],
    progress: bool,
) -> Path:
    tmp_dir = ranks.broadcast(writer.tmp_dir if writer is not None else None)

    def merge_mine() -> None:
        todo = [k for k in mine if not _finished(tmp_dir / shard_file_name(k), shards[k])]
        files = _ShardFiles(tmp_dir, {k: shards[k] for k in todo}, sizes)
        names = [name for k in todo for name in shards[k]]
        with disk_errors(out_dir):
            merge_tensors(plan, names, files, device=str(ranks.device), progress=progress and ranks.is_writer)

    if not ranks.distributed:
        merge_mine()
    else:
        error = None
        try:
            merge_mine()
        except Exception as err:  # reported to every rank below
            error = f"rank {ranks.rank}: {type(err).__name__}: {err}"
        errors = [e for e in ranks.all_gather(error) if e is not None]
        if errors:
            raise MergeError("distributed merge failed: " + "; ".join(errors))

    def adopt_and_finalize() -> Path:
        assert writer is not None
        for k, names in enumerate(shards):
            writer.add_shard_file(tmp_dir / shard_file_name(k), names)
        finish(writer)
        return writer.finalize(expected=set(plan.names))

    return ranks.on_writer(adopt_and_finalize)
