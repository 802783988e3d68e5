"""One MoE layer's experts: transformers' fused experts module, and the same experts read expert by expert.

transformers 5 stores a layer's experts as one module with ``gate_up_proj`` (E x 2I x d, or E x d x 2I
when ``is_transposed``) and ``down_proj`` (E x d x I, or E x I x d), ``*_bias`` when ``has_bias``.
Converting a whole layer to that layout in the forward dtype holds the tensors as read, the converted
pieces and the float32 result at once (about 3 layers plus its on-disk bytes). An :class:`ExpertBank`
instead keeps the experts in their storage dtype and hands them out one expert at a time:

- ``resident``: the fused tensors in the checkpoint's dtype (the on-disk bytes once), filled piece by
  piece from the checkpoint (the merged model's experts, when the memory plan has room for them);
- ``lazy``: nothing held; each expert is read from the memory-mapped checkpoint when it is used (the
  sources' experts, read in every pass, and the merged model's when the plan has no room for them).

RegMean writes the experts it solves, a group at a time, to work files of on-disk tensors
(:meth:`ExpertBank.rewrite`): a resident bank copies them in, a lazy one reads them from there.

:func:`expert_forward` is the experts module's forward over a bank: a group of experts (about 256 MB in
the forward dtype) is cast at once and the tokens routed to them go through one grouped matrix product
per projection, ``down(act(gate x) * up x)`` times the routing weight, added into the output in expert
order: the arithmetic of transformers' eager experts loop, bit for bit (tests/test_expert_bank.py), at
the speed of its grouped kernel plus the cast (benchmarks/real_width.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from moemerge.architectures.layout import ArchitectureError, ExpertPiece

if TYPE_CHECKING:
    from moemerge.checkpoint.reader import CheckpointReader

BANK_ATTRIBUTE = "_moemerge_bank"
"""Attribute of an experts module whose experts an :class:`ExpertBank` holds (its own parameters stay on meta)."""

MATRICES = ("gate_up_proj", "down_proj")


def experts_module(layer: torch.nn.Module, where: str) -> tuple[str, torch.nn.Module]:
    """The fused experts module of a decoder layer (transformers' ``use_experts_implementation`` class)."""
    found = [(n, m) for n, m in layer.named_modules() if hasattr(m, "is_transposed") and "down_proj" in m._parameters]
    if len(found) != 1:
        raise ArchitectureError(f"{where}: expected one fused experts module, found {[n for n, _ in found]}")
    name, module = found[0]
    if not getattr(module, "has_gate", False) or getattr(module, "has_post_expert_norm", False):
        raise ArchitectureError(
            f"{where}.{name} ({type(module).__name__}): RegMean implements gated experts (gate_up_proj, "
            "down_proj, _apply_gate) without a post-expert norm; this one has has_gate="
            f"{getattr(module, 'has_gate', None)}, has_post_expert_norm={getattr(module, 'has_post_expert_norm', None)}"
        )
    return name, module


def banks_experts(module: torch.nn.Module) -> bool:
    """Whether a bank can hold this experts module's experts: gated, no biases, no post-expert norm, not transposed."""
    return (
        bool(getattr(module, "has_gate", False))
        and not getattr(module, "has_bias", True)
        and not getattr(module, "has_post_expert_norm", True)
        and not getattr(module, "is_transposed", True)
        and all(name in module._parameters for name in MATRICES)
    )


class ExpertBank:
    """A layer's experts in their storage dtype, one (out x in) matrix per expert and name (``MATRICES``).

    Built from :func:`moemerge.architectures.layout.expert_pieces`: expert e's rows of a fused tensor are
    the listed on-disk tensors, in order. ``resident`` keeps the fused tensors (filled one piece at a time);
    otherwise every :meth:`matrix` call reads its pieces from the checkpoint, or from the work file that
    rewrote them (:meth:`rewrite`).
    """

    def __init__(
        self,
        reader: CheckpointReader,
        pieces: dict[str, list[list[ExpertPiece]]],
        shapes: dict[str, tuple[int, int, int]],
        dtype: torch.dtype,
        resident: bool,
        device: torch.device | str = "cpu",
    ):
        self.reader = reader
        self.pieces = pieces
        self.shapes = shapes
        self.dtype = dtype
        self.device = torch.device(device)
        self.tensors: dict[str, Tensor] = {}
        self._rewritten: dict[str, Any] = {}  # on-disk name -> open handle of the work file that holds it now
        if resident:
            for name, shape in shapes.items():
                fused = torch.empty(shape, dtype=dtype, device=device)  # on a GPU, filled there piece by piece
                for e, own in enumerate(pieces[name]):
                    for piece in own:
                        fused[e, piece.start : piece.stop] = reader.read(piece.name)
                self.tensors[name] = fused

    @property
    def experts(self) -> int:
        return self.shapes[MATRICES[0]][0]

    @property
    def resident(self) -> bool:
        return bool(self.tensors)

    def _read(self, name: str) -> Tensor:
        handle = self._rewritten.get(name)
        return self.reader.read(name) if handle is None else handle.get_tensor(name)

    def matrix(self, name: str, expert: int) -> Tensor:
        """Expert `expert`'s matrix `name` (out x in) in the storage dtype."""
        if self.tensors:
            return self.tensors[name][expert]
        parts = [self._read(piece.name) for piece in self.pieces[name][expert]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def group(self, name: str, first: int, last: int) -> Tensor:
        """Experts first..last-1 of matrix `name` (experts x out x in), in the storage dtype."""
        if self.tensors:
            return self.tensors[name][first:last]
        return torch.stack([self.matrix(name, e) for e in range(first, last)])

    def tensor(self, name: str) -> Tensor:
        """The fused tensor `name` (experts x out x in), as transformers lays it out in memory (resident only)."""
        if name not in self.tensors:
            raise ValueError(f"{self.reader.model_dir}: a lazy expert bank holds no fused {name}")
        return self.tensors[name]

    def on_disk(self, name: str, expert: int, matrix: Tensor) -> dict[str, Tensor]:
        """Expert `expert`'s new matrix `name` as the on-disk tensors it is stored in, each its own copy in the
        bank's dtype (what :meth:`rewrite` reads back)."""
        if tuple(matrix.shape) != tuple(self.shapes[name][1:]):
            raise ValueError(
                f"{name}: expert {expert}'s matrix of shape {tuple(matrix.shape)}, expected {self.shapes[name][1:]}"
            )
        return {
            piece.name: matrix[piece.start : piece.stop].to("cpu", self.dtype, copy=True)
            for piece in self.pieces[name][expert]
        }

    def rewrite(self, file: Path) -> list[str]:
        """The on-disk tensors in the safetensors `file` replace the checkpoint's from now on: a resident bank
        copies them in, a lazy one reads them from `file` when they are used. Returns their names."""
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt", device="cpu")
        held = list(handle.keys())
        names = set(held)
        for name, experts in self.pieces.items():
            for e, own in enumerate(experts):
                for piece in own:
                    if piece.name not in names:
                        continue
                    if self.tensors:
                        self.tensors[name][e, piece.start : piece.stop] = handle.get_tensor(piece.name)
                    else:
                        self._rewritten[piece.name] = handle
                    names.discard(piece.name)
        if names:
            raise ValueError(f"{file}: holds {sorted(names)[0]}, which is not one of this bank's experts")
        return held


def bank_of(module: torch.nn.Module) -> ExpertBank | None:
    return getattr(module, BANK_ATTRIBUTE, None)


FORWARD_GROUP_BYTES = 2**28
"""Experts cast together to the forward dtype in the banked forward: about 256 MB (10 OLMoE experts in float32,
one DeepSeek-V3 expert), enough to run them as one grouped matrix product."""


def forward_group(numbers_per_expert: int, forward_bytes: int) -> int:
    """Experts per group of the banked forward: as many as ``FORWARD_GROUP_BYTES`` holds, at least one."""
    return max(1, FORWARD_GROUP_BYTES // max(numbers_per_expert * forward_bytes, 1))


def expert_forward(
    module: torch.nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
) -> Tensor:
    """The experts module's output from its bank, a group of experts at a time.

    Per group, its experts' matrices are cast to the forward dtype together and the tokens routed to
    them, sorted by expert, go through one grouped product per projection (``torch.nn.functional.grouped_mm``:
    per expert, its rows times its matrix); each token's weighted outputs are added into the result in
    expert order. The arithmetic of transformers' eager experts loop, with one group in the forward dtype.
    """
    bank = bank_of(module)
    dtype, device = hidden_states.dtype, hidden_states.device
    experts = bank.experts
    result = torch.zeros_like(hidden_states)
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)[:experts]
    ends = torch.cumsum(counts, 0).tolist()
    numbers = sum(math.prod(bank.shapes[name][1:]) for name in MATRICES)
    group = forward_group(numbers, hidden_states.element_size())
    for first in range(0, experts, group):
        last = min(first + group, experts)
        start, stop = (ends[first - 1] if first else 0), ends[last - 1]
        if stop == start:
            continue
        slots = order[start:stop]
        tokens, position = slots // top_k, slots % top_k
        offsets = torch.cumsum(counts[first:last], 0).to(torch.int32)
        weights = [bank.group(name, first, last).to(device, dtype) for name in MATRICES]
        hidden = module._apply_gate(torch.nn.functional.grouped_mm(hidden_states[tokens], weights[0].mT, offs=offsets))
        out = torch.nn.functional.grouped_mm(hidden, weights[1].mT, offs=offsets)
        result.index_add_(0, tokens, (out * top_k_weights[tokens, position, None]).to(result.dtype))
    return result


def install_bank(module: torch.nn.Module, bank: ExpertBank) -> None:
    """Let `module` run from `bank` (its own parameters stay on the meta device)."""
    setattr(module, BANK_ATTRIBUTE, bank)
    module.forward = lambda *args, **kwargs: expert_forward(module, *expert_call(module, args, kwargs))


def remove_bank(module: torch.nn.Module) -> None:
    if BANK_ATTRIBUTE in vars(module):
        delattr(module, BANK_ATTRIBUTE)
        del module.forward


def expert_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of an experts call, whatever the argument names."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    if len(values) < 3:
        raise TypeError(f"{type(module).__name__} called with {len(values)} arguments, expected 3")
    return values[0], values[1], values[2]


class Matrices(Protocol):
    """Per-expert matrices: ``matrices[e]`` is expert e's (out x in) matrix."""

    def __getitem__(self, expert: int) -> Tensor: ...


class _CastMatrices:
    """Per-expert matrices of a fused module or bank, each cast to `dtype` when it is asked for."""

    def __init__(self, fused: FusedExperts, name: str, dtype: torch.dtype):
        self.fused, self.name, self.dtype = fused, name, dtype

    def __getitem__(self, expert: int) -> Tensor:
        return self.fused.matrix(self.name, expert).detach().to(self.dtype)


class FusedExperts:
    """Read and write one fused experts module as per-expert [W | b] matrices (out x in(+1)).

    transformers 5 stores experts as ``gate_up_proj`` (E x 2I x d, or E x d x 2I when
    ``is_transposed``; gate and up concatenated or interleaved, which only ``_apply_gate`` needs to
    know) and ``down_proj`` (E x d x I, or E x I x d), with ``*_bias`` when ``has_bias``. When the
    module runs from an :class:`ExpertBank`, the bank holds the matrices.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.transposed = bool(module.is_transposed)
        self.bias = bool(module.has_bias)
        self.bank = bank_of(module)

    def _matrix(self, name: str) -> Tensor:
        if self.bank is not None:
            return self.bank.tensor(name)
        weight = self.module._parameters[name]
        weight = weight.mT if self.transposed else weight
        if self.bias:
            weight = torch.cat([weight, self.module._parameters[f"{name}_bias"].unsqueeze(-1)], dim=-1)
        return weight

    def shape(self, name: str) -> tuple[int, int, int]:
        """(experts, out, in (+1 with biases)) of `name`, without reading anything."""
        if self.bank is not None:
            return self.bank.shapes[name]
        experts, rows, cols = self.module._parameters[name].shape
        out, inp = (cols, rows) if self.transposed else (rows, cols)
        return experts, out, inp + int(self.bias)

    def matrix(self, name: str, expert: int) -> Tensor:
        """Expert `expert`'s [W | b] of `name`, in the dtype it is held in."""
        if self.bank is not None:
            return self.bank.matrix(name, expert)
        weight = self.module._parameters[name][expert]  # one expert, not the layer's [W | b] (a copy with biases)
        weight = weight.mT if self.transposed else weight
        if self.bias:
            weight = torch.cat([weight, self.module._parameters[f"{name}_bias"][expert].unsqueeze(-1)], dim=-1)
        return weight

    def gate_up(self) -> Tensor:
        """E x 2I x (d + bias)."""
        return self._matrix("gate_up_proj")

    def down(self) -> Tensor:
        """E x d x (I + bias)."""
        return self._matrix("down_proj")

    def tensor(self, name: str) -> Tensor:
        """The in-memory tensor `name` as the model holds it (the bank's fused tensor when banked)."""
        return self.bank.tensor(name) if self.bank is not None else self.module._parameters[name]

    def set(self, name: str, expert: int, matrix: Tensor) -> None:
        """Write expert `expert`'s [W | b] of `name` (gate_up_proj or down_proj) into the module."""
        if self.bank is not None:
            raise TypeError(f"{name}: experts in a bank are rewritten through ExpertBank.rewrite, not set")
        with torch.no_grad():
            weight = self.module._parameters[name]
            w = matrix[:, : matrix.shape[1] - int(self.bias)]
            weight[expert] = (w.T if self.transposed else w).to(weight.dtype)
            if self.bias:
                bias = self.module._parameters[f"{name}_bias"]
                bias[expert] = matrix[:, -1].to(bias.dtype)

    def activation(self, gate_up_out: Tensor) -> Tensor:
        """The hidden activation from the gate/up output, by the module's own gating (exact per family)."""
        return self.module._apply_gate(gate_up_out)

    def weights(self, dtype: torch.dtype) -> ExpertWeights:
        """The experts in `dtype`, each expert cast when it is used (no copy of the layer's experts)."""
        return ExpertWeights(
            _CastMatrices(self, "gate_up_proj", dtype),
            _CastMatrices(self, "down_proj", dtype),
            self.bias,
            self.activation,
        )

    def parameter_names(self) -> list[str]:
        names = list(MATRICES)
        return names + [f"{n}_bias" for n in names] if self.bias else names


@dataclass(frozen=True)
class ExpertWeights:
    """One layer's experts as [W | b] matrices in the work dtype, with their gating function."""

    gate_up: Matrices  # expert e: 2I x (d + bias)
    down: Matrices  # expert e: d x (I + bias)
    bias: bool
    activation: Callable[[Tensor], Tensor]


def routed_rows(index: Tensor, weights: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """Rows (tokens) routed to `expert` and each one's routing weight (summed over its top-k slots)."""
    hit = index == expert
    rows = hit.any(dim=1).nonzero().flatten()
    return rows, (weights * hit).sum(dim=1)[rows]
