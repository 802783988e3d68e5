"""Plan a calibration run to a memory budget (``--max-memory``), before any layer is run.

The formulas are those of docs/CALIBRATION.md ("Memory"), per rank, in bytes. With d the hidden
size, E experts, K domains, T_i the padded and N_i the real tokens of domain i on this rank
(T = sum T_i, N = sum N_i, T_max, N_max the largest domain), s the storage bytes of an activation
(``activation_dtype``), f the forward bytes (``forward_dtype``), c the solver's work bytes:

    resident     embeddings, final norm, output head:         numbers outside the layers x f
    layer        the largest decoder layer:                    its numbers x f
    batch        one forward batch inside the layer:           B x (20 d + 2 heads L + 4 k m + 4 E) x f
                 (B = batch_tokens, L the longest sample, k top-k, m the expert width; an estimate
                 fitted to one OLMoE layer's measured forward, benchmarks/scaling.py)
    hidden       every sequence's hidden state, plus one domain's new outputs:  (T + T_max) d s
    recorded     router inputs of the layer being solved, plus one domain's
                 pieces before they are joined:                 (N + N_max) d s
    solver       per-token source probabilities N E c, batch temporaries, (K + 10) E d float64
                 CG and statistic buffers, and the preconditioner (see ``required_bytes``)

    peak = resident + layer + max(batch + hidden + recorded,  (T d s) + (N d s) + solver)

On the CPU all of it is host memory. With ``--device cuda`` it is device memory, except that the
hidden states may be kept in host memory (moved to the GPU one batch at a time) when the device
budget is short, and that each layer is converted on the host before it moves to the GPU (one
layer x f of host memory, for the time of the forward).

To meet a budget the planner, in this order, halves the forward batch (down to
the longest sample; slower, same result), on a GPU keeps the hidden states in host memory (one
copy to the GPU per batch and layer), falls back to a weaker preconditioner (more CG iterations,
same result), and stores activations in bfloat16 instead of float32 (changes the result
slightly: benchmarks/scaling.py measures by how much). A budget that the smallest plan still
exceeds is an error before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moemerge.architectures.layout import ModelLayout
from moemerge.calibrate.distributed import assign_shards
from moemerge.calibrate.options import CalibrationOptions, PreconditionerName, RouterSolveOptions
from moemerge.calibrate.preconditioners import choose_preconditioner, required_bytes
from moemerge.calibrate.walk import LAYER_INDEX
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.data import pack

_FALLBACK: tuple[PreconditionerName, ...] = ("block", "kronecker", "diagonal", "none")
_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the run may use per rank, in host memory and in device (GPU) memory; None: no limit."""

    host: int | None = None
    device: int | None = None

    @property
    def limited(self) -> bool:
        return self.host is not None or self.device is not None


def parse_budget(text: str | int | None, device: str) -> MemoryBudget:
    """``64GB`` (the memory the work runs in: host on cpu, the GPU with cuda) or ``host=200GB,device=80GB``."""
    from moemerge.merge.driver import parse_size

    if text is None:
        return MemoryBudget()
    cuda = device.startswith("cuda")
    try:
        if isinstance(text, int) or "=" not in text:
            size = parse_size(text)
            return MemoryBudget(device=size) if cuda else MemoryBudget(host=size)
        parts = dict(part.split("=", 1) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"--max-memory {text!r}: expected e.g. 64GB, 80GiB or host=200GB,device=80GB") from None
    unknown = sorted(set(parts) - {"host", "device"})
    if unknown:
        raise ValueError(f"--max-memory {text!r}: unknown part {unknown[0]!r}; use host=SIZE and/or device=SIZE")
    budget = MemoryBudget(
        host=parse_size(parts["host"]) if "host" in parts else None,
        device=parse_size(parts["device"]) if "device" in parts else None,
    )
    if budget.device is not None and not cuda:
        raise ValueError(f"--max-memory {text!r}: a device budget needs --device cuda (the run is on {device})")
    return budget


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about the model, from its config and checkpoint headers."""

    hidden: int
    experts: int
    top_k: int
    heads: int
    expert_width: int
    layer_numbers: int
    resident_numbers: int

    @classmethod
    def of(cls, layout: ModelLayout, reader: CheckpointReader) -> ModelShape:
        config = layout.config.get_text_config() if hasattr(layout.config, "get_text_config") else layout.config
        hidden = int(config.hidden_size)
        width = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden)
        first = layout.moe_layers[0]
        per_layer: dict[int, int] = {}
        resident = 0
        for name in reader.names():
            numel = math.prod(reader.info(name).shape)
            match = LAYER_INDEX.search(name)
            if match:
                per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + numel
            else:
                resident += numel
        return cls(
            hidden=hidden,
            experts=first.num_experts,
            top_k=first.top_k,
            heads=int(getattr(config, "num_attention_heads", 1)),
            expert_width=int(width),
            layer_numbers=max(per_layer.values(), default=0),
            resident_numbers=resident,
        )


@dataclass(frozen=True)
class RankTokens:
    """Tokens of each domain on the busiest rank: padded (T_i, forward) and real (N_i, router inputs)."""

    padded: tuple[int, ...]
    real: tuple[int, ...]
    longest: int


def batch_sizes(lengths: Sequence[int], batch_tokens: int) -> list[tuple[int, int]]:
    """(padded, real) tokens of each batch that `moemerge.data.batches` packs from samples of these lengths."""
    return [(lengths[rows[0]] * len(rows), sum(lengths[i] for i in rows)) for rows in pack(list(lengths), batch_tokens)]


def rank_tokens(lengths: Sequence[Sequence[int]], batch_tokens: int, world_size: int) -> RankTokens:
    """Per domain, the most padded and real tokens any rank holds (sharded as the runner shards batches)."""
    padded, real = [], []
    for domain in lengths:
        sizes = batch_sizes(domain, batch_tokens)
        shards = assign_shards([r for _, r in sizes], world_size) if world_size > 1 else [list(range(len(sizes)))]
        padded.append(max(sum(sizes[i][0] for i in s) for s in shards))
        real.append(max(sum(sizes[i][1] for i in s) for s in shards))
    return RankTokens(tuple(padded), tuple(real), max((max(d, default=0) for d in lengths), default=0))


@dataclass(frozen=True)
class MemoryPlan:
    """How the run will use memory: the settings chosen and the estimated peak, per rank."""

    batch_tokens: int
    activation_dtype: str
    preconditioner: PreconditionerName
    hidden_on: str
    """'host' or 'device': where hidden states live between layers ('host' on the CPU)."""
    host_bytes: int
    device_bytes: int
    parts: tuple[tuple[str, int, str], ...]
    """(what, bytes, where) of each term of the peak."""
    budget: MemoryBudget
    changes: tuple[str, ...]
    world_size: int
    on_gpu: bool

    def apply(self, options: CalibrationOptions) -> CalibrationOptions:
        """``options`` with the planned batch, storage dtype and preconditioner."""
        harc = options.harc.model_copy(update={"preconditioner": self.preconditioner})
        update = {"batch_tokens": self.batch_tokens, "activation_dtype": self.activation_dtype, "harc": harc}
        return options.model_copy(update=update)

    def describe(self) -> str:
        def gb(n: int | None) -> str:
            return "no limit" if n is None else f"{n / 1e9:.3g} GB"

        lines = [
            f"memory plan per rank ({self.world_size} rank{'s' if self.world_size > 1 else ''}): "
            f"batch_tokens {self.batch_tokens}, activations {self.activation_dtype}, "
            f"preconditioner {self.preconditioner}, hidden states on {self.hidden_on}"
        ]
        lines += [f"  {what:<44} {n / 1e9:>9.3f} GB  {where}" for what, n, where in self.parts]
        lines.append(f"  {'peak host':<44} {self.host_bytes / 1e9:>9.3f} GB  (budget {gb(self.budget.host)})")
        if self.on_gpu:
            lines.append(f"  {'peak device':<44} {self.device_bytes / 1e9:>9.3f} GB  (budget {gb(self.budget.device)})")
        if self.changes:
            lines.append("  to fit the budget: " + "; ".join(self.changes))
        return "\n".join(lines)


def solver_bytes(
    tokens: int, experts: int, dim: int, num_domains: int, harc: RouterSolveOptions, preconditioner: PreconditionerName
) -> int:
    """What one router solve holds beside its activations: per-token source probabilities (N E c), one
    batch's temporaries, (K + 10) E x dim float64 statistics and CG vectors, and the preconditioner
    (for kronecker the transient of its build, measured by benchmarks/scaling.py)."""
    c = _BYTES[harc.dtype]
    b = min(harc.batch_size, max(tokens, 1))
    precond = required_bytes(preconditioner, experts, dim, torch.float64 if c == 8 else torch.float32)
    if preconditioner == "kronecker":  # its build holds ~5 dim x dim float64 matrices (Grams, blend, factor)
        precond = max(precond, 5 * dim * dim * 8)
    return tokens * experts * c + b * dim * c + 4 * b * experts * c + (num_domains + 10) * experts * dim * 8 + precond


def _estimate(
    shape: ModelShape,
    tokens: RankTokens,
    options: CalibrationOptions,
    *,
    batch_tokens: int,
    storage: str,
    preconditioner: PreconditionerName,
    hidden_on: str,
    num_domains: int,
    on_gpu: bool,
) -> tuple[int, int, tuple[tuple[str, int, str], ...]]:
    d, E = shape.hidden, shape.experts
    s, f = _BYTES[storage], _BYTES[options.forward_dtype]
    T, N = sum(tokens.padded), sum(tokens.real)
    t_max, n_max = max(tokens.padded, default=0), max(tokens.real, default=0)
    per_token = 20 * d + 2 * shape.heads * tokens.longest + 4 * shape.top_k * shape.expert_width + 4 * E
    work = "device" if on_gpu else "host"
    solver = solver_bytes(N, E, d + 1, num_domains, options.harc, preconditioner)
    layer, resident = shape.layer_numbers * f, shape.resident_numbers * f
    hidden, recorded = (T + t_max) * d * s, (N + n_max) * d * s
    terms = [  # (what, where, bytes while running the layer's forward, bytes while solving its router)
        ("resident (embeddings, head)", work, resident, resident),
        ("one decoder layer", work, layer, layer),
        (f"forward batch of {batch_tokens} tokens (estimate)", work, batch_tokens * per_token * f, 0),
        (f"hidden states ({T} + {t_max} tokens)", hidden_on, hidden, T * d * s),
        (f"router inputs ({N} + {n_max} tokens)", work, recorded, N * d * s),
        (f"solver ({preconditioner})", work, 0, solver),
    ]
    if on_gpu:  # a layer is converted on the host before it moves to the GPU
        terms.append(("one decoder layer, staged on the host", "host", layer, 0))
    forward, solve = {"host": 0, "device": 0}, {"host": 0, "device": 0}
    for _, where, during_forward, during_solve in terms:
        forward[where] += during_forward
        solve[where] += during_solve
    parts = tuple((what, max(a, b), where) for what, where, a, b in terms)
    return max(forward["host"], solve["host"]), max(forward["device"], solve["device"]), parts


def plan_memory(
    shape: ModelShape,
    lengths: Sequence[Sequence[int]],
    options: CalibrationOptions,
    budget: MemoryBudget,
    *,
    world_size: int = 1,
    on_gpu: bool = False,
) -> MemoryPlan:
    """The plan closest to ``options`` whose estimated peak fits ``budget`` (module docstring).

    Args:
        shape: the model's sizes (:meth:`ModelShape.of`).
        lengths: token counts of every calibration sample, per domain (all ranks).
        options: the requested options; only batch_tokens, activation_dtype and the preconditioner
            may change.
        budget: per-rank byte limits.
        world_size: ranks the batches are sharded over.
        on_gpu: whether the work runs on a GPU.
    """
    longest = max((max(d, default=0) for d in lengths), default=0)
    batches = [options.batch_tokens]
    while batches[-1] // 2 >= max(longest, 1):
        batches.append(batches[-1] // 2)
    storages = [options.activation_dtype] + (["bfloat16"] if options.activation_dtype == "float32" else [])
    requested = choose_preconditioner(
        options.harc.preconditioner, shape.experts, shape.hidden + 1, torch.float32, options.harc.memory_budget_bytes
    )
    preconditioners = list(_FALLBACK[_FALLBACK.index(requested) :])
    placements = ["device", "host"] if on_gpu else ["host"]
    tokens_by_batch = {bt: rank_tokens(lengths, bt, world_size) for bt in batches}

    def fits(host: int, device: int) -> bool:
        return (budget.host is None or host <= budget.host) and (budget.device is None or device <= budget.device)

    last = None
    for storage in storages:  # innermost first: what costs least is given up first
        for preconditioner in preconditioners:
            for hidden_on in placements:
                for bt in batches:
                    host, device, parts = _estimate(
                        shape,
                        tokens_by_batch[bt],
                        options,
                        batch_tokens=bt,
                        storage=storage,
                        preconditioner=preconditioner,
                        hidden_on=hidden_on,
                        num_domains=len(lengths),
                        on_gpu=on_gpu,
                    )
                    plan = MemoryPlan(
                        batch_tokens=bt,
                        activation_dtype=storage,
                        preconditioner=preconditioner,
                        hidden_on=hidden_on,
                        host_bytes=host,
                        device_bytes=device,
                        parts=parts,
                        budget=budget,
                        changes=_changes(options, bt, storage, preconditioner, hidden_on, on_gpu),
                        world_size=world_size,
                        on_gpu=on_gpu,
                    )
                    if fits(host, device):
                        return plan
                    last = plan
    assert last is not None
    largest = ", ".join(f"{what} {_gb(n)} on {where}" for what, n, where in sorted(last.parts, key=lambda p: -p[1])[:3])
    raise ValueError(
        f"--max-memory: the budget (host {_gb(budget.host)}, device {_gb(budget.device)} per rank) cannot be met; "
        f"the smallest plan needs host {_gb(last.host_bytes)}"
        + (f", device {_gb(last.device_bytes)}" if on_gpu else "")
        + f" (batch_tokens {last.batch_tokens}, {last.activation_dtype} activations, preconditioner "
        f"{last.preconditioner}; largest parts: {largest}). Raise the budget, "
        "calibrate on fewer tokens (--max-samples, --max-length) or run on more ranks."
    )


def _gb(n: int | None) -> str:
    return "no limit" if n is None else f"{n / 1e9:.3g} GB"


def _changes(
    options: CalibrationOptions, bt: int, storage: str, preconditioner: str, hidden_on: str, on_gpu: bool
) -> tuple[str, ...]:
    changes = []
    if bt != options.batch_tokens:
        changes.append(f"batch_tokens {options.batch_tokens} -> {bt}")
    if preconditioner != options.harc.preconditioner:
        changes.append(f"preconditioner {options.harc.preconditioner} -> {preconditioner}")
    if storage != options.activation_dtype:
        changes.append(f"activation_dtype {options.activation_dtype} -> {storage}")
    if on_gpu and hidden_on == "host":
        changes.append("hidden states kept in host memory")
    return tuple(changes)
