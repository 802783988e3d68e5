"""The stage-1 tensor loop: for each on-disk name read base + K sources, merge, hand to a writer, drop.

At any time the loop holds the K+1 versions of ONE tensor (plus the kernel's temporaries and the
writer's current shard); with a row-separable method (linear, task arithmetic) the K+1 versions of one
block of rows of a large tensor, plus that tensor in the output dtype. `merge_tensors` takes any list
of names, so the distributed version (`merge/distributed.py`) gives each rank its own subset and writer.

Every tensor read and every tensor returned is checked for NaN and Inf (moemerge/finite.py),
overflow of the output dtype included: the error names the model folder and the tensor. For a
weighted sum (`MergeMethod.spreads_non_finite`) the output's check covers the inputs the kernel
takes, which are read again one by one only when it fails, to name the culprit; this keeps the
checks of the cheapest, I/O-bound merges under 5 % of their time (benchmarks/merge_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moemerge.checkpoint.reader import is_float_code
from moemerge.finite import check_cast, check_finite, is_finite
from moemerge.merge.plan import MergePlan

if TYPE_CHECKING:
    import torch

    from moemerge.checkpoint.writer import CheckpointWriter

BLOCK_BYTES = 256 * 2**20
"""Work-dtype bytes of one input above which a row-separable method merges a tensor in blocks of rows."""

RELEASE_BYTES = 64 * 2**20
"""Bytes a reader may read before its memory-mapped shards are closed (see `merge_tensors`)."""


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def merge_tensor(plan: MergePlan, name: str, device: str = "cpu", block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """The output tensor of one on-disk name, in the output dtype, on the CPU.

    With a row-separable method (`MergeMethod.row_separable`) a tensor whose work-dtype copy exceeds
    `block_bytes` is merged in blocks of rows into the output: the same bits, holding one block per input.
    """
    import torch

    out_dtype = _torch_dtype(plan.recipe.output_dtype)
    if name in plan.copy_from:
        tensor = _read(plan, plan.copy_from[name], name)
        if not tensor.is_floating_point():
            return tensor
        out = tensor.to(out_dtype)
        check_cast(tensor, out, f"tensor {name} copied from {plan.copy_from[name]}")
        return out
    info = plan.readers[plan.reference].info(name)
    if not is_float_code(info.dtype):
        return plan.readers[plan.reference].read(name)  # integer buffers (e.g. position ids) are not weights
    work = _torch_dtype(plan.recipe.work_dtype)
    rows = info.shape[0] if info.shape else 1
    row_bytes = math.prod(info.shape[1:]) * work.itemsize
    if not plan.method.row_separable or rows * row_bytes <= block_bytes or not info.shape:
        return _merge_rows(plan, name, None, device)
    out = torch.empty(info.shape, dtype=out_dtype)
    step = max(block_bytes // max(row_bytes, 1), 1)
    for start in range(0, rows, step):
        out[start : start + step] = _merge_rows(plan, name, (start, min(start + step, rows)), device)
    return out


def _merge_rows(plan: MergePlan, name: str, rows: tuple[int, int] | None, device: str) -> torch.Tensor:
    """The merged rows ``start:stop`` of one floating tensor (all of it for None), in the output dtype."""
    from moemerge.merge.registry import TensorContext

    work, out_dtype = _torch_dtype(plan.recipe.work_dtype), _torch_dtype(plan.recipe.output_dtype)
    spreads = plan.method.spreads_non_finite  # then the output check covers the inputs the kernel takes
    takes_base = plan.base is not None and plan.method.needs_base  # linear takes none: reading it would be waste
    inputs = ([plan.base] if takes_base else []) + list(plan.sources)
    where = name if rows is None else f"{name} (rows {rows[0]}:{rows[1]})"
    tensors = [_read(plan, model, name, rows, check=not spreads).to(device=device, dtype=work) for model in inputs]
    base, sources = (tensors[0], tensors[1:]) if takes_base else (None, tensors)
    params, source_params = plan.params[name]
    ctx = TensorContext(name, seed=plan.recipe.seed, is_linear_weight=name in plan.linear_weights)
    merged = plan.method(base, sources, source_params, params, ctx)
    del base, sources, tensors
    out = merged.to(device="cpu", dtype=out_dtype)
    if not is_finite(out):
        if spreads:  # name the input it came from, if any
            for model in inputs:
                _read(plan, model, name, rows, check=True)
        check_cast(merged, out, f"merged tensor {where} ({plan.method.name} of finite inputs)")
    return out


def _read(
    plan: MergePlan, model: str, name: str, rows: tuple[int, int] | None = None, check: bool = True
) -> torch.Tensor:
    """One source tensor (or its rows ``start:stop``), refused if it holds NaN or Inf (a merge would spread them)."""
    reader = plan.readers[model]
    tensor = reader.read(name) if rows is None else reader.read_rows(name, *rows)
    if check:
        check_finite(tensor, f"{model}: tensor {name}" + ("" if rows is None else f" (rows {rows[0]}:{rows[1]})"))
    return tensor


def merge_tensors(
    plan: MergePlan,
    names: Sequence[str],
    writer: CheckpointWriter,
    *,
    device: str = "cpu",
    progress: bool = True,
    release_bytes: int = RELEASE_BYTES,
) -> None:
    """Merge `names` (any subset of `plan.names`, in any order) into `writer`, one tensor at a time.

    The readers memory-map their shards, and every page a read touches stays mapped (and counted
    in the process's RSS) until the file is closed; so each reader's handles are closed after it
    has read `release_bytes`, which keeps that page cache to about K+1 times `release_bytes`.
    """
    from tqdm.auto import tqdm

    read = dict.fromkeys(plan.readers, 0)
    for name in tqdm(names, desc=f"{plan.method.name} merge", unit="tensor", disable=not progress):
        writer.add(name, merge_tensor(plan, name, device))
        for path, reader in plan.readers.items():
            read[path] += reader.info(name).nbytes
            if read[path] >= release_bytes:
                reader.close()
                read[path] = 0
