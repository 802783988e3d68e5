"""torch.distributed for moemerge: which rank holds which work, sums over all ranks' tokens.

It sits below both stages: stage 1 (moemerge/merge/distributed.py) hands each rank whole output
shards (:func:`assign_shards`), and stage 2 is data parallel over calibration batches. Every rank
builds the same batches of every domain (tokenising is cheap and deterministic), keeps its share
(:meth:`Ranks.shard`), and runs each decoder layer on that share only, so hidden states and router
inputs are split across ranks. Every sum over tokens the solver needs (operator applications, right-hand side,
diagonal, preconditioner blocks and factors, token counts, agreement counts) is a float64
partial sum that :meth:`Ranks.reduce` all-reduces, through the operator's ``reduce`` hook
(moemerge/calibrate/operator.py). So every rank holds the same statistics of the union of all
tokens, runs the same CG on the same numbers and reaches the same router, bit for bit, with no
broadcast of the solution. What only one rank does (the work folder, the output) runs on rank 0
through :meth:`Ranks.on_writer`, which hands rank 0's result or error to every rank.

Layer weights are not broadcast: every rank reads the layer it needs from the checkpoint
(memory-mapped safetensors), so the checkpoint must be visible on every node (shared file
system or one copy per node); see docs/SCALING.md for why.

Processes are started by ``torchrun``; with WORLD_SIZE > 1 in the environment, :func:`init_ranks`
joins the process group from torchrun's variables: NCCL when the work runs on CUDA (each rank on
``cuda:LOCAL_RANK``), gloo on the CPU. Without torchrun everything here is the identity.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""Longest wait of one collective (the slowest rank's layer forward or file I/O must fit)."""


class RankFailure(RuntimeError):
    """A collective failed: another rank died or the connection between ranks broke."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one run, and the collectives moemerge needs.

    ``world_size == 1`` (the default) is the single-process run: every method is the identity.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the work folder and the output."""
        return self.rank == 0

    def _collective(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except RuntimeError as err:  # DistBackendError and gloo's connection errors are RuntimeErrors
            raise RankFailure(
                f"rank {self.rank} of {self.world_size}: {what} failed ({str(err).splitlines()[0]}); another rank "
                "has probably died (see its log). Finished layers are kept in the work folder: rerun the same "
                "command to resume."
            ) from err

    def reduce(self, partial_sum: Tensor) -> Tensor:
        """Sum of ``partial_sum`` over all ranks (the operator's ``reduce`` hook); dtype and device kept."""
        if not self.distributed:
            return partial_sum
        import torch.distributed as dist

        total = partial_sum.contiguous()
        self._collective("all-reduce", lambda: dist.all_reduce(total))
        return total

    def shard(self, items: Sequence[T], sizes: Sequence[int], what: str) -> list[T]:
        """This rank's items, in their original order (:func:`assign_shards`; ``what`` names them in errors)."""
        if not self.distributed:
            return list(items)
        if len(items) < self.world_size:
            raise ValueError(
                f"{what}: {len(items)} item(s) for {self.world_size} ranks, even with one sample per batch; every rank "
                "needs at least one (add calibration text or run on fewer ranks)"
            )
        return [items[i] for i in assign_shards(sizes, self.world_size)[self.rank]]

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        device = self.device if self.device.type == "cuda" else None
        self._collective("broadcast", lambda: dist.broadcast_object_list(box, src=0, device=device))
        return box[0]

    def on_writer(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only; every rank returns its result, or raises its error.

        This is also a barrier: no rank returns before rank 0 has finished. A ValueError on rank 0
        (bad input) is a ValueError everywhere, so every rank exits with the same one-line message.
        """
        if not self.distributed:
            return work()
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_writer:
            try:
                outcome = ("ok", work())
            except Exception as err:  # handed to the other ranks, then re-raised here
                error = err
                outcome = ("value" if isinstance(err, ValueError) else "error", f"{type(err).__name__}: {err}")
        status, payload = self.broadcast(outcome)
        if error is not None:
            raise error
        if status == "value":
            raise ValueError(f"rank 0: {payload}")
        if status == "error":
            raise RuntimeError(f"rank 0 failed: {payload}")
        return payload

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[T] = [value] * self.world_size
        self._collective("all-gather", lambda: dist.all_gather_object(out, value))
        return out

    def check_same(self, tensor: Tensor, what: str) -> None:
        """Raise unless ``tensor`` has the same bytes on every rank (the ranks' CGs must not have diverged)."""
        if not self.distributed:
            return
        import hashlib

        digest = hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        digests = self.all_gather(digest)
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RankFailure(f"{what} differs between rank 0 and rank(s) {differ}: the ranks' solves diverged")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._collective("barrier", dist.barrier)


def assign_shards(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of the items each rank gets: largest first to the least-loaded rank (ties: lower rank).

    Deterministic, every item on exactly one rank, each rank's indices in increasing order. With
    ``sizes`` the tokens of each batch, ranks end within one batch of each other.
    """
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(i)
        loads[rank] += sizes[i]
    return [sorted(s) for s in shards]


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """This process's :class:`Ranks`, joining torchrun's process group when WORLD_SIZE > 1.

    ``device`` is the work device asked for (cpu or cuda). Distributed, each rank works on
    ``cuda:LOCAL_RANK`` with NCCL, or on the CPU with gloo. A process group that is already
    initialised (e.g. by a caller) is used as it is.
    """
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch sees no GPU (torch.cuda.is_available() is False)")
    world = world_size_from_env()
    if world <= 1:
        return Ranks(0, 1, torch.device(device))
    if cuda and ":" in device:
        raise ValueError(f"device {device!r}: under torchrun give --device cuda; each rank uses cuda:LOCAL_RANK")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    work_device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    gpus = torch.cuda.is_available()
    if gpus:  # NCCL talks to the current device, whichever stage initialised the group
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(  # on a GPU host both, so that a CPU stage 1 and a CUDA stage 2 share one group
            backend="cpu:gloo,cuda:nccl" if gpus else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=work_device if cuda else None,
        )
        atexit.register(_destroy)
    if dist.get_world_size() != world:
        raise ValueError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}")
    ranks = Ranks(dist.get_rank(), world, work_device)
    logger.info("rank %d of %d on %s (%s)", ranks.rank, world, work_device, dist.get_backend())
    return ranks


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
