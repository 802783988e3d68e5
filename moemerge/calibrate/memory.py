"""Plan a calibration run to a memory budget (``--max-memory``), before any layer is run.

The formulas are those of docs/CALIBRATION.md ("Memory"), per rank, in bytes. With d the hidden
size, E experts, K domains, T_i the padded and N_i the real tokens of domain i on this rank
(T = sum T_i, N = sum N_i, T_max, N_max the largest domain), s the storage bytes of an activation
(``activation_dtype``), f the forward bytes (``forward_dtype``), c the solver's work bytes:

    resident     what the walk holds outside the layers:      their numbers x f, without the output head (never
                 computed) and the input embedding (each batch's rows are read from disk), walk.py
    layer        the largest decoder layer as the walk holds it: its numbers x f; with a bank (below),
                 its numbers outside the routed experts x f, plus the experts' on-disk bytes X
    cast         with a bank, a group of experts read and cast for the forward (about 256 MB in f,
                 ``forward_group``):  g_f (a + c) (f + q)
    batch        one forward batch inside the layer:           B x (20 d + 2 heads L + 4 k m + 4 E) x f
                 (B the largest batch's padded tokens, at most batch_tokens; L the longest sample, k top-k,
                 m the expert width; an estimate fitted to one OLMoE layer's measured forward,
                 benchmarks/scaling.py)
    hidden       every sequence's hidden state, plus one domain's new outputs:  (T + T_max) d s
    recorded     router inputs of the layer being solved, plus one domain's
                 pieces before they are joined:                 (N + N_max) d s
    solver       per-token source probabilities N E c, batch temporaries, (K + 10) E d float64
                 CG and statistic buffers, and the preconditioner (see ``required_bytes``)
    converting   the tensors as read and the converted pieces, beside the result: 2 x (converted
                 numbers) x f + their on-disk bytes (measured by benchmarks/experts_memory.py: 3 layers
                 plus the on-disk bytes in all when the whole layer is converted)

    materialise = resident + layer + converting + T d s
    forward     = resident + layer + cast + batch + hidden + recorded
    solve       = resident + layer + T d s + N d s + solver           (without routers: no solve)

A bank (``ModelShape.banked``; moemerge/calibrate/fused_experts.py) holds a layer's routed experts in
their storage dtype, read piece by piece, whenever their on-disk tensors are one expert's rows each
(``expert_pieces``): the merged model's resident (X bytes), a source's lazy (read one expert at a time
when used, nothing held). Other layouts (GPT-OSS) are converted whole, as before. The merged model's bank
may be lazy too (``MemoryPlan.merged_bank``): X = 0, and every forward batch reads the layer's experts from
the checkpoint (the page cache, or the disk when the layer does not fit in it), and RegMean's new experts
from the group files it wrote them to.

With ``experts`` (routing-aware RegMean, moemerge/calibrate/experts.py) each layer first makes
passes over the sources (one per group of experts; sequential: per group and projection), each
materialising one source's layer, then solves and writes the new experts. With I the expert width,
b = 1 when the experts have biases, a = 2I (d + b) and c = d (I + b) the numbers of one expert's
gate/up and down, S_a = 8 (a + (d + b)^2) and S_c = 8 (c + (I + b)^2) their float64 sums
(``RegMeanSums.bytes_per_map``), g the experts per group (as many as ``regmean.sums_budget_bytes``
holds, at least one), g' = g when there is more than one group (else 0), w the work bytes
(``work_dtype``), D the on-disk bytes of a layer, q those of one expert number in a bank (else 0) and
p those of a stage-1 expert number as the layer holds it (q with a bank, else f):

    sources      the sources' hidden states, one per domain:   T d s, (T + T_max) d s in a pass
                 (the pass that advances them holds one domain's new ones)
    source layer one source's decoder layer without its (lazily read) experts:  layer', and
                 layer' + converting while it is read and converted (layer' = layer - X with a bank)
    sums         classic     load, pass  g (S_a + S_c)
                 sequential  load, pass  g max(S_a, S_c)  (a task sums one map)
                 solves      the pass's sums + g max(a, c) (8 + p) (one map's solution and its stage-1 slice)
                 output      none (nothing of a task is referenced once it is done)
    map solve    one map's Cholesky and right-hand side:       8 (3 in^2 + 4 out in), largest map
    fold         one batch's expert inputs and one expert's products, and the expert matrices cast to
                 the work dtype:  (B (4 d + 6 I) + in^2 + 2 out in) w + (2a + c) w + (a + c) q
    inputs       sequential: one domain's merged-model expert inputs:  N_max d f
    linears      ``linear_layers: all``: the sums of every other linear of the layer:  sum of 8 (out in + in^2)
    output       without a bank, the new experts in the checkpoint's dtype as saved:  2 E (a + c) q' (a copy,
                 and its on-disk conversion; q' the checkpoint's bytes per number); with a bank, each
                 map's solution is written to a group file as it is solved, as on-disk tensors (g max(a, c)
                 q and its serialised copy, within the solve's term; on a GPU in host memory beside it)

    load    = resident + layer + T d s + sources + source layer (converting) + sums + linears
    pass    = resident + layer + cast + batch + T d s + sources + source layer + sums + fold + inputs + linears
    regmean = resident + layer + T d s + sources + sums + map solve + linears
    output  = regmean's terms with the output's sums, plus output

No copy of the layer's experts is made besides: the stage-1 values a solve falls back to are the
group's slice of the layer (each expert is rewritten only after its own solve), and the experts a
fold hook uses are cast one expert at a time.

and the sources' T d s also stays through forward and solve. The peak is the largest phase. It
counts tensors: the interpreter's own memory and what the C allocator keeps of freed tensors come
on top (benchmarks/experts_memory.py measures both).

On the CPU all of it is host memory. With ``--device cuda`` it is device memory, except that the
hidden states may be kept in host memory (moved to the GPU one batch at a time) when the device
budget is short, that each layer is converted on the host before it moves to the GPU (one layer
x f of host memory during the forward; 3 layer + D while a source's layer is converted), and that
RegMean's output is written from host memory.

To meet a budget the planner, in this order, halves the forward batch (down to
the longest sample; slower, same result), on a GPU keeps the hidden states in host memory (one
copy to the GPU per batch and layer), reads the merged model's experts from disk when used instead
of holding them (slower, same result: at OLMoE width 10 % more time for HARC, benchmarks/real_width.py),
with ``experts`` lowers ``sums_budget_bytes`` so that the experts are done in more, smaller groups (each
group one more pass over the sources, each costing more than reading the experts again; same result),
falls back to a weaker preconditioner (more CG iterations, same result), and
stores activations in bfloat16 instead of float32 (changes the result slightly: benchmarks/scaling.py
measures by how much). A budget that the smallest plan still exceeds is an error before any work starts.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from moemerge.architectures.layout import ArchitectureError, ModelLayout, build_meta_model, expert_pieces
from moemerge.calibrate.fused_experts import MATRICES, FusedExperts, banks_experts, experts_module, forward_group
from moemerge.calibrate.options import CalibrationOptions, PreconditionerName, RouterSolveOptions
from moemerge.calibrate.preconditioners import FALLBACK_ORDER, choose_preconditioner, required_bytes, resolve_auto
from moemerge.calibrate.regmean_sums import RegMeanSums
from moemerge.calibrate.walk import LAYER_INDEX, walk_without_head
from moemerge.checkpoint.reader import CheckpointReader, is_float_code
from moemerge.data import pack
from moemerge.distributed import assign_shards
from moemerge.units import parse_size

_FALLBACK: tuple[PreconditionerName, ...] = FALLBACK_ORDER
_PHASES = ("materialise", "forward", "solve", "load", "pass", "regmean", "output")
"""A layer being materialised, its forward, its router solve; with experts, a source layer being materialised, a
source's pass, RegMean's solves, and the layer's RegMean output (the new tensors)."""
_Term = tuple[str, str, dict[str, int]]
"""(what, where: host or device, bytes during each phase it is held in)."""
_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


AVAILABLE_SHARE = 0.9
"""Share of the memory available now that a run without ``--max-memory`` plans for: the plan counts tensors,
and the interpreter, libraries and the C allocator's kept pages come on top (benchmarks/experts_memory.py)."""


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the run may use per rank, in host memory and in device (GPU) memory; None: no limit."""

    host: int | None = None
    device: int | None = None
    origin: str = "--max-memory"
    """Where the budget comes from: ``--max-memory``, or what the host (and GPU) have available."""

    @property
    def limited(self) -> bool:
        return self.host is not None or self.device is not None


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still allocate (limit minus usage; v2, else v1), None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    candidates = [(root / v2.lstrip("/"), "memory.max", "memory.current")] if v2 is not None else []
    candidates += [(root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_file, usage_file in candidates:
        try:
            limit, usage = (folder / limit_file).read_text().strip(), (folder / usage_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes a huge number for no limit
            return None
        return max(int(limit) - int(usage), 0)
    return None


def process_held_bytes() -> int:
    """Anonymous memory this process holds now (RssAnon: the interpreter, the libraries, the tokenised text;
    not the memory-mapped checkpoints), which the run's tensors come on top of; 0 where /proc cannot tell."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    found = [int(line.split()[1]) * 1024 for line in lines if line.startswith("RssAnon:")]
    return found[0] if found else 0


def host_available() -> int | None:
    """Host memory available to this process now: MemAvailable (/proc/meminfo), capped by its cgroup's room."""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    found = [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    room = _cgroup_room()
    values = [v for v in (found[0] if found else None, room) if v is not None]
    return min(values) if values else None


def available_budget(device: str, local_ranks: int = 1) -> MemoryBudget:
    """The budget of a run without ``--max-memory``: ``AVAILABLE_SHARE`` of what the host has available now,
    shared by the ranks of this node, and of the GPU's free memory with cuda. No limit where it cannot be read."""
    host = host_available()
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = int(torch.cuda.mem_get_info(torch.device(device))[0] * AVAILABLE_SHARE)
    return MemoryBudget(
        host=None if host is None else int(host * AVAILABLE_SHARE) // max(local_ranks, 1),
        device=gpu,
        origin=f"available memory ({AVAILABLE_SHARE:.0%} of it; set --max-memory to plan for another budget)",
    )


def parse_budget(text: str | int | None, device: str) -> MemoryBudget:
    """``64GB`` (the memory the work runs in: host on cpu, the GPU with cuda), ``host=200GB,device=80GB``, or
    ``unlimited`` (plan, but never stop or adapt). None: the memory available now (:func:`available_budget`)."""
    if text is None:
        return available_budget(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if isinstance(text, str) and text.strip().lower() == "unlimited":
        return MemoryBudget(origin="--max-memory unlimited")
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
    layer_disk_bytes: int
    """On-disk bytes of the largest decoder layer (what materialising it reads and copies)."""
    expert_maps: tuple[tuple[int, int], ...] = ()
    """(out, in) of one expert's matrices as RegMean solves them, [W | b]: gate/up (2I, d + b), down (d, I + b).
    Empty when the experts are not a module RegMean handles (it refuses them)."""
    expert_bias: bool = False
    linear_maps: tuple[tuple[int, int], ...] = ()
    """(out, in + b) of the linears ``linear_layers: all`` solves, in the layer where their sums are largest."""
    banked: bool = False
    """Whether the walk holds the routed experts in a bank (storage dtype, read piece by piece; walk.py)
    rather than converting them with the layer."""
    expert_disk_bytes: int = 0
    """On-disk bytes of one MoE layer's routed experts (what a resident bank holds)."""
    router_kind: str = "softmax"
    """How the routers score experts (``RouterKind``): ``auto`` picks its preconditioner by it."""

    @property
    def expert_numbers(self) -> int:
        """Numbers of one MoE layer's routed experts (gate/up and down, biases included)."""
        return self.experts * sum(o * i for o, i in self.expert_maps)

    @property
    def converted_numbers(self) -> int:
        """Numbers of a layer converted to the forward dtype when it is materialised (all but a bank's experts)."""
        return self.layer_numbers - (self.expert_numbers if self.banked else 0)

    @property
    def expert_number_bytes(self) -> int:
        """On-disk bytes of one expert number (the bank's dtype); 0 when not banked."""
        return self.expert_disk_bytes // max(self.expert_numbers, 1) if self.banked else 0

    def layer_bytes(self, forward_bytes: int, resident_bank: bool = True) -> int:
        """One decoder layer in memory: its converted numbers x f, plus a resident bank's on-disk experts."""
        bank = self.expert_disk_bytes if self.banked and resident_bank else 0
        return self.converted_numbers * forward_bytes + bank

    def converting_bytes(self, forward_bytes: int) -> int:
        """What converting a layer holds beside its result: the tensors as read and the converted pieces
        (measured: 3 layers + its on-disk bytes in all); only the part outside a bank is converted."""
        rest_disk = self.layer_disk_bytes - (self.expert_disk_bytes if self.banked else 0)
        return 2 * self.converted_numbers * forward_bytes + rest_disk

    def expert_cast_bytes(self, forward_bytes: int) -> int:
        """A group of experts read from a bank (storage dtype) and cast to the forward dtype, as the banked
        forward runs them (``fused_experts.forward_group``)."""
        per_expert = sum(o * i for o, i in self.expert_maps)
        group = min(forward_group(per_expert, forward_bytes), self.experts)
        return group * per_expert * (forward_bytes + self.expert_number_bytes) if self.banked else 0

    @classmethod
    def of(cls, layout: ModelLayout, reader: CheckpointReader, stored_as: str | None = None) -> ModelShape:
        """The shape of the checkpoint ``reader`` reads; with ``stored_as`` (a dtype name), of the same tensors
        once written in that dtype (floating tensors only), e.g. a stage-1 output planned before it exists."""

        def disk_bytes(name: str) -> int:
            info = reader.info(name)
            if stored_as is None or not is_float_code(info.dtype):
                return info.nbytes
            return math.prod(info.shape) * _BYTES[stored_as]

        config = layout.config.get_text_config() if hasattr(layout.config, "get_text_config") else layout.config
        hidden = int(config.hidden_size)
        width = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden)
        first = layout.moe_layers[0]
        per_layer: dict[int, int] = {}
        disk_per_layer: dict[int, int] = {}
        resident = 0
        model = build_meta_model(layout.config)
        _, skipped = walk_without_head(model)  # the output head, and the embedding read by rows
        for name in reader.names():
            info = reader.info(name)
            match = LAYER_INDEX.search(name)
            if match:
                index = int(match.group(1))
                per_layer[index] = per_layer.get(index, 0) + math.prod(info.shape)
                disk_per_layer[index] = disk_per_layer.get(index, 0) + disk_bytes(name)
            elif name not in skipped:
                resident += math.prod(info.shape)
        layers = model.get_submodule(layout.layers_module)
        banked, expert_disk = False, 0
        try:
            name, module = experts_module(layers[first.index], f"{layout.layers_module}.{first.index}")
            experts = FusedExperts(module)
            expert_maps = (experts.shape("gate_up_proj")[1:], experts.shape("down_proj")[1:])
            if banks_experts(module):
                path = f"{layout.layers_module}.{first.index}.{name}"
                found = [expert_pieces(model, f"{path}.{m}", tuple(module._parameters[m].shape)) for m in MATRICES]
                names = [piece.name for pieces in found if pieces for own in pieces for piece in own]
                banked = all(found) and all(n in reader for n in names)
                expert_disk = sum(disk_bytes(n) for n in names) if banked else 0
        except ArchitectureError:
            experts, expert_maps = None, ()
        routers = {
            i.index: i.router_module.removeprefix(f"{layout.layers_module}.{i.index}.") for i in layout.moe_layers
        }
        linears = [_linear_maps(layer, routers.get(i, "")) for i, layer in enumerate(layers)]
        return cls(
            hidden=hidden,
            experts=first.num_experts,
            top_k=first.top_k,
            heads=int(getattr(config, "num_attention_heads", 1)),
            expert_width=int(width),
            layer_numbers=max(per_layer.values(), default=0),
            resident_numbers=resident,
            layer_disk_bytes=max(disk_per_layer.values(), default=0),
            expert_maps=expert_maps,
            expert_bias=experts is not None and experts.bias,
            linear_maps=max(linears, key=lambda maps: sum(RegMeanSums.bytes_per_map(o, i) for o, i in maps)),
            banked=banked,
            expert_disk_bytes=expert_disk,
            router_kind=layout.router_kind.value,
        )


def _linear_maps(layer: torch.nn.Module, router: str) -> tuple[tuple[int, int], ...]:
    """(out, in + b) of the linears of a decoder layer that RegMean's ``linear_layers: all`` solves: every
    ``nn.Linear`` with weights except the router (``router``: its name in the layer, empty in a dense layer)."""
    return tuple(
        (module.out_features, module.in_features + (module.bias is not None))
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module.weight.numel() > 0
        and not (router and (name == router or name.startswith(router + ".")))
    )


@dataclass(frozen=True)
class RankTokens:
    """Tokens of each domain on the busiest rank: padded (T_i, forward) and real (N_i, router inputs)."""

    padded: tuple[int, ...]
    real: tuple[int, ...]
    longest: int
    largest_batch: int = 0
    """Padded tokens of the largest batch (at most ``batch_tokens``): what one forward batch holds."""


def batch_sizes(lengths: Sequence[int], batch_tokens: int) -> list[tuple[int, int]]:
    """(padded, real) tokens of each batch that `moemerge.data.batches` packs from samples of these lengths."""
    return [(lengths[rows[0]] * len(rows), sum(lengths[i] for i in rows)) for rows in pack(list(lengths), batch_tokens)]


def rank_tokens(lengths: Sequence[Sequence[int]], batch_tokens: int, world_size: int) -> RankTokens:
    """Per domain, the most padded and real tokens any rank holds (sharded as the runner shards batches)."""
    padded, real, largest = [], [], 0
    for domain in lengths:
        sizes = batch_sizes(domain, batch_tokens)
        largest = max([largest] + [p for p, _ in sizes])
        shards = assign_shards([r for _, r in sizes], world_size) if world_size > 1 else [list(range(len(sizes)))]
        padded.append(max(sum(sizes[i][0] for i in s) for s in shards))
        real.append(max(sum(sizes[i][1] for i in s) for s in shards))
    longest = max((max(d, default=0) for d in lengths), default=0)
    return RankTokens(tuple(padded), tuple(real), longest, largest)


class MemoryPlanError(ValueError):
    """No plan fits the budget; ``plan`` is the smallest one (``describe()`` says what it holds)."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class MemoryPlan:
    """How the run will use memory: the settings chosen and the estimated peak, per rank."""

    batch_tokens: int
    activation_dtype: str
    preconditioner: PreconditionerName
    hidden_on: str
    """'host' or 'device': where hidden states live between layers ('host' on the CPU)."""
    sums_budget_bytes: int | None
    """RegMean's ``sums_budget_bytes`` (the requested one unless the plan lowered it)."""
    expert_group: int | None
    """Experts per RegMean group, as ``sums_budget_bytes`` makes them; None when the experts are not merged."""
    host_bytes: int
    device_bytes: int
    parts: tuple[tuple[str, int, str], ...]
    """(what, bytes, where) of each term of the peak."""
    budget: MemoryBudget
    changes: tuple[str, ...]
    world_size: int
    on_gpu: bool
    merged_bank: Literal["resident", "lazy"] = "resident"
    """How the walk holds the merged model's routed experts: ``resident`` (a bank of the layer's on-disk bytes)
    or ``lazy`` (read from the checkpoint, or RegMean's group files, when a batch needs them)."""

    def apply(self, options: CalibrationOptions) -> CalibrationOptions:
        """``options`` with the planned batch, storage dtype, preconditioner and RegMean sums budget."""
        harc = options.harc.model_copy(update={"preconditioner": self.preconditioner})
        regmean = options.regmean.model_copy(update={"sums_budget_bytes": self.sums_budget_bytes})
        update = {"batch_tokens": self.batch_tokens, "activation_dtype": self.activation_dtype, "harc": harc}
        return options.model_copy(update=update | {"regmean": regmean})

    def describe(self) -> str:
        lines = [
            f"memory plan per rank ({self.world_size} rank{'s' if self.world_size > 1 else ''}): "
            f"batch_tokens {self.batch_tokens}, activations {self.activation_dtype}, "
            f"preconditioner {self.preconditioner}, hidden states on {self.hidden_on}"
            + (", experts read from disk when used (lazy bank)" if self.merged_bank == "lazy" else "")
            + (
                ""
                if self.expert_group is None
                else f", RegMean sums_budget_bytes {self.sums_budget_bytes} (experts in groups of {self.expert_group})"
            )
        ]
        lines += [f"  {what:<44} {n / 1e9:>9.3f} GB  {where}" for what, n, where in self.parts]
        lines.append(f"  {'peak host':<44} {self.host_bytes / 1e9:>9.3f} GB  (budget {_gb(self.budget.host)})")
        lines.insert(1, f"  budget from {self.budget.origin}")
        if self.on_gpu:
            device = f"  {'peak device':<44} {self.device_bytes / 1e9:>9.3f} GB"
            lines.append(f"{device}  (budget {_gb(self.budget.device)})")
        if self.changes:
            lines.append("  to fit the budget: " + "; ".join(self.changes))
        return "\n".join(lines)


def solver_bytes(
    tokens: int,
    experts: int,
    dim: int,
    num_domains: int,
    harc: RouterSolveOptions,
    preconditioner: PreconditionerName,
    kind: str = "softmax",
) -> int:
    """What one router solve holds beside its activations: per-token source probabilities (N E c), one
    batch's temporaries, (K + 10) E x dim float64 statistics and CG vectors, and the preconditioner
    (for kronecker the transient of its build, measured by benchmarks/scaling.py)."""
    c = _BYTES[harc.dtype]
    b = min(harc.batch_size, max(tokens, 1))
    precond = required_bytes(preconditioner, experts, dim, torch.float64 if c == 8 else torch.float32, kind)
    if preconditioner == "kronecker":  # its build holds ~5 dim x dim float64 matrices (Grams, blend, factor)
        precond = max(precond, 5 * dim * dim * 8)
    return tokens * experts * c + b * dim * c + 4 * b * experts * c + (num_domains + 10) * experts * dim * 8 + precond


def expert_sums_bytes(shape: ModelShape) -> int:
    """Float64 sums of one expert, gate/up and down: the unit of ``sums_budget_bytes`` (as experts.py's ``_tasks``)."""
    return sum(RegMeanSums.bytes_per_map(out, inp) for out, inp in shape.expert_maps)


def group_bytes(shape: ModelShape, group: int, variant: str, slice_bytes: int) -> dict[str, int]:
    """RegMean's float64 sums and solved experts for groups of `group` experts, by phase of :func:`_estimate`.

    Mirrors ``RegMeanCalibration._calibrate``: a task's sums (both maps, classic; one, sequential) live
    through its passes and solves; each map's solve returns a float64 matrix per expert, next to the
    experts' stage-1 slice, and is written (to the module, or a bank's group file) before the next map's;
    nothing of a task is referenced once it is done, so tasks do not overlap and the output phase holds no sums.
    """
    (o_a, i_a), (o_c, i_c) = shape.expert_maps
    a, c = o_a * i_a, o_c * i_c
    s_a, s_c = RegMeanSums.bytes_per_map(o_a, i_a), RegMeanSums.bytes_per_map(o_c, i_c)
    sums = group * (s_a + s_c if variant == "classic" else max(s_a, s_c))
    solved = group * max(a, c) * (8 + slice_bytes)  # one map's solution, and its stage-1 slice as the layer holds it
    return {"load": sums, "pass": sums, "regmean": sums + solved, "output": 0}


def _estimate(
    shape: ModelShape,
    tokens: RankTokens,
    options: CalibrationOptions,
    *,
    batch_tokens: int,
    storage: str,
    preconditioner: PreconditionerName,
    hidden_on: str,
    expert_group: int | None,
    num_domains: int,
    on_gpu: bool,
    merged_bank: str = "resident",
    held_bytes: int = 0,
) -> tuple[int, int, tuple[tuple[str, int, str], ...]]:
    d, E = shape.hidden, shape.experts
    s, f = _BYTES[storage], _BYTES[options.forward_dtype]
    T, N = sum(tokens.padded), sum(tokens.real)
    t_max, n_max = max(tokens.padded, default=0), max(tokens.real, default=0)
    per_token = 20 * d + 2 * shape.heads * tokens.longest + 4 * shape.top_k * shape.expert_width + 4 * E
    work = "device" if on_gpu else "host"
    resident = shape.resident_numbers * f
    batch = min(batch_tokens, tokens.largest_batch or batch_tokens) * per_token * f
    # a resident bank lives where the work runs (on a GPU it is filled there, one on-disk piece at a time)
    converted = shape.converted_numbers * f
    bank = shape.layer_bytes(f, resident_bank=merged_bank == "resident") - converted
    cast = shape.expert_cast_bytes(f)
    terms: list[_Term] = [
        ("this process before the walk (libraries, text)", "host", dict.fromkeys(_PHASES, held_bytes)),
        ("outside the layers (final norm)", work, dict.fromkeys(_PHASES, resident)),
        (
            "one decoder layer" + (" (experts: see bank)" if shape.banked else ""),
            work,
            dict.fromkeys(_PHASES, converted),
        ),
        ("its experts in a bank (storage dtype)", work, dict.fromkeys(_PHASES, bank)),
        ("experts read and cast, a group (forward)", work, {"forward": cast, "pass": cast}),
        (
            f"forward batch of {min(batch_tokens, tokens.largest_batch or batch_tokens)} tokens (estimate)",
            work,
            {"forward": batch, "pass": batch},
        ),
        (
            f"hidden states ({T} + {t_max} tokens)",
            hidden_on,
            dict.fromkeys(_PHASES, T * d * s) | {"forward": (T + t_max) * d * s},
        ),
    ]
    if options.routers:
        terms += [
            (f"router inputs ({N} + {n_max} tokens)", work, {"forward": (N + n_max) * d * s, "solve": N * d * s}),
            (
                f"solver ({preconditioner})",
                work,
                {"solve": solver_bytes(N, E, d + 1, num_domains, options.harc, preconditioner, shape.router_kind)},
            ),
        ]
    if expert_group is not None:
        terms += _regmean_terms(shape, tokens, options, batch_tokens, storage, expert_group, work, hidden_on)
    reading = shape.converting_bytes(f)  # as read and converted pieces, beside the result (measured)
    if on_gpu:  # a layer (merged, or a source's) is converted on the host before it moves to the GPU
        terms.append(
            (
                "one decoder layer, staged on the host",
                "host",
                {"materialise": reading + converted, "forward": converted, "load": reading + converted},
            )
        )
    else:
        terms.append(("materialising a layer: pieces read and converted", work, {"materialise": reading}))
    phases = ["materialise", "forward"] + (["solve"] if options.routers else [])
    phases += ["load", "pass", "regmean", "output"] if expert_group is not None else []
    peaks = {"host": 0, "device": 0}
    for phase in phases:
        for where in peaks:
            peaks[where] = max(peaks[where], sum(b.get(phase, 0) for _, w, b in terms if w == where))
    parts = tuple((what, max(b.get(p, 0) for p in phases), where) for what, where, b in terms)
    return peaks["host"], peaks["device"], tuple(part for part in parts if part[1] > 0)


def _regmean_terms(
    shape: ModelShape,
    tokens: RankTokens,
    options: CalibrationOptions,
    batch_tokens: int,
    storage: str,
    group: int,
    work: str,
    hidden_on: str,
) -> list[_Term]:
    """The terms RegMean of the experts adds (module docstring), by phase of :func:`_estimate`."""
    regmean = options.regmean
    d, inter = shape.hidden, shape.expert_width
    s, f, w = _BYTES[storage], _BYTES[options.forward_dtype], _BYTES[regmean.work_dtype]
    T, t_max, n_max = sum(tokens.padded), max(tokens.padded, default=0), max(tokens.real, default=0)
    sequential = regmean.variant == "sequential"
    experts = shape.expert_numbers
    disk = experts * shape.layer_disk_bytes // max(shape.layer_numbers, 1)  # the experts in the checkpoint's dtype
    linears = shape.linear_maps if regmean.linear_layers == "all" else ()
    linear_sums = sum(RegMeanSums.bytes_per_map(o, i) for o, i in linears)
    maps = shape.expert_maps + linears
    (o_a, i_a), (o_c, i_c) = shape.expert_maps
    # the source's expert, and in a sequential down pass the merged model's gate/up, cast to the work dtype
    casts = (2 * o_a * i_a + o_c * i_c) * w + (o_a * i_a + o_c * i_c) * shape.expert_number_bytes
    fold = (
        min(batch_tokens, tokens.largest_batch or batch_tokens) * (4 * d + 6 * inter)
        + max(i * i + 2 * o * i for o, i in maps)
    ) * w + casts
    map_solve = max(8 * (3 * i * i + 4 * o * i) for o, i in maps)
    layer = shape.layer_bytes(f, resident_bank=False)  # a source's experts are read from disk when used (lazy bank)
    loading = layer if work == "device" else layer + shape.converting_bytes(f)  # on a GPU, converted on the host
    slice_bytes = shape.expert_number_bytes if shape.banked else f
    if shape.banked:  # a group's solution as on-disk tensors and their serialised copy; on a GPU, on the host
        group_file = 2 * group * max(o_a * i_a, o_c * i_c) * shape.expert_number_bytes
        saved = ("RegMean: a group's new experts, written", "host", {"regmean": group_file if work == "device" else 0})
    else:
        saved = ("RegMean: new experts as saved, and converted", "host", {"output": 2 * disk})
    return [
        (
            f"sources' hidden ({T} + {t_max} tokens)",
            hidden_on,
            dict.fromkeys(_PHASES, T * d * s) | {"pass": (T + t_max) * d * s},
        ),
        ("one source's decoder layer (read, converted)", work, {"load": loading, "pass": layer}),
        (
            f"RegMean: sums and solutions, groups of {group}",
            work,
            group_bytes(shape, group, regmean.variant, slice_bytes),
        ),
        ("RegMean: one map's solve", work, {"regmean": map_solve, "output": map_solve}),
        (
            f"RegMean: fold of a {min(batch_tokens, tokens.largest_batch or batch_tokens)}-token batch",
            work,
            {"pass": fold},
        ),
        (f"RegMean: expert inputs ({n_max} tokens)", work, {"pass": n_max * d * f if sequential else 0}),
        ("RegMean: sums of the other linears", work, dict.fromkeys(("load", "pass", "regmean", "output"), linear_sums)),
        saved,
    ]


def plan_memory(
    shape: ModelShape,
    lengths: Sequence[Sequence[int]],
    options: CalibrationOptions,
    budget: MemoryBudget,
    *,
    world_size: int = 1,
    on_gpu: bool = False,
    held_bytes: int = 0,
) -> MemoryPlan:
    """The plan closest to ``options`` whose estimated peak fits ``budget`` (module docstring).

    Args:
        shape: the model's sizes (:meth:`ModelShape.of`).
        lengths: token counts of every calibration sample, per domain (all ranks).
        options: the requested options; only batch_tokens, activation_dtype, the preconditioner and
            RegMean's sums_budget_bytes may change.
        budget: per-rank byte limits.
        world_size: ranks the batches are sharded over.
        on_gpu: whether the work runs on a GPU.
        held_bytes: host memory the process holds before the walk (:func:`process_held_bytes`), planned
            as it is: 0.3-0.4 GB of interpreter and libraries, which the budget covers too.
    """
    if options.experts and not shape.expert_maps:
        raise ValueError("experts: true: the model's experts are not a fused gated module, which RegMean needs")
    longest = max((max(d, default=0) for d in lengths), default=0)
    batches = [options.batch_tokens]
    while batches[-1] // 2 >= max(longest, 1):
        batches.append(batches[-1] // 2)
    storages = [options.activation_dtype] + (["bfloat16"] if options.activation_dtype == "float32" else [])
    requested = choose_preconditioner(
        options.harc.preconditioner,
        shape.experts,
        shape.hidden + 1,
        torch.float32,
        options.harc.memory_budget_bytes,
        shape.router_kind,
    )
    preconditioners: list[PreconditionerName] = (
        list(_FALLBACK[_FALLBACK.index(requested) :]) if options.routers else [requested]
    )
    if requested == resolve_auto(options.harc.preconditioner, shape.experts, shape.hidden + 1, shape.router_kind):
        preconditioners[0] = options.harc.preconditioner  # "auto" stays "auto" while what it stands for fits
    placements = ["device", "host"] if on_gpu else ["host"]
    # the merged model's experts may be read from disk when used instead of held
    banks: list[Literal["resident", "lazy"]] = ["resident", "lazy"] if shape.banked else ["resident"]
    groups = _expert_groups(shape, options)  # (experts per group, sums_budget_bytes)
    tokens_by_batch = {bt: rank_tokens(lengths, bt, world_size) for bt in batches}

    def fits(host: int, device: int) -> bool:
        return (budget.host is None or host <= budget.host) and (budget.device is None or device <= budget.device)

    last = None
    # the last knob varies fastest: what costs least is given up first
    for storage, preconditioner, (group, sums_budget), bank, hidden_on, bt in itertools.product(
        storages, preconditioners, groups, banks, placements, batches
    ):
        host, device, parts = _estimate(
            shape,
            tokens_by_batch[bt],
            options,
            batch_tokens=bt,
            storage=storage,
            preconditioner=preconditioner,
            hidden_on=hidden_on,
            expert_group=group,
            num_domains=len(lengths),
            on_gpu=on_gpu,
            merged_bank=bank,
            held_bytes=held_bytes,
        )
        plan = MemoryPlan(
            batch_tokens=bt,
            activation_dtype=storage,
            preconditioner=preconditioner,
            hidden_on=hidden_on,
            sums_budget_bytes=sums_budget,
            expert_group=group,
            host_bytes=host,
            device_bytes=device,
            parts=parts,
            budget=budget,
            changes=_changes(options, bt, storage, preconditioner, hidden_on, sums_budget, group, on_gpu, bank),
            world_size=world_size,
            on_gpu=on_gpu,
            merged_bank=bank,
        )
        if fits(host, device):
            return plan
        last = plan
    assert last is not None
    largest = ", ".join(f"{what} {_gb(n)} on {where}" for what, n, where in sorted(last.parts, key=lambda p: -p[1])[:3])
    where = "--max-memory" if budget.origin == "--max-memory" else f"the budget from {budget.origin}"
    raise MemoryPlanError(
        f"{where}: the budget (host {_gb(budget.host)}, device {_gb(budget.device)} per rank) cannot be met; "
        f"the smallest plan needs host {_gb(last.host_bytes)}"
        + (f", device {_gb(last.device_bytes)}" if on_gpu else "")
        + f" (batch_tokens {last.batch_tokens}, {last.activation_dtype} activations, preconditioner "
        f"{last.preconditioner}"
        + ("" if last.expert_group is None else f", RegMean experts in groups of {last.expert_group}")
        + f"; largest parts: {largest}). Raise the budget, "
        "calibrate on fewer tokens (--max-samples, --max-length) or run on more ranks. The smallest plan:\n"
        + last.describe(),
        last,
    )


def _expert_groups(shape: ModelShape, options: CalibrationOptions) -> list[tuple[int | None, int | None]]:
    """(experts per RegMean group, ``sums_budget_bytes``) to try, largest group first: the requested budget's,
    then the smallest group for each larger number of groups (passes). [(None, requested)] without experts."""
    budget = options.regmean.sums_budget_bytes
    if not options.experts:
        return [(None, budget)]
    E, unit = shape.experts, expert_sums_bytes(shape)
    requested = E if budget is None else max(1, min(E, budget // max(unit, 1)))
    smaller = sorted({-(-E // n) for n in range(1, E + 1)} - set(range(requested, E + 1)), reverse=True)
    return [(requested, budget)] + [(g, g * unit) for g in smaller]


def _gb(n: int | None) -> str:
    return "no limit" if n is None else f"{n / 1e9:.3g} GB"


def _changes(
    options: CalibrationOptions,
    bt: int,
    storage: str,
    preconditioner: str,
    hidden_on: str,
    sums_budget: int | None,
    group: int | None,
    on_gpu: bool,
    merged_bank: str,
) -> tuple[str, ...]:
    changes = []
    if merged_bank == "lazy":
        changes.append("the merged model's experts read from disk when used, not held (slower, same result)")
    if bt != options.batch_tokens:
        changes.append(f"batch_tokens {options.batch_tokens} -> {bt}")
    if preconditioner != options.harc.preconditioner:
        changes.append(f"preconditioner {options.harc.preconditioner} -> {preconditioner}")
    if storage != options.activation_dtype:
        changes.append(f"activation_dtype {options.activation_dtype} -> {storage}")
    if on_gpu and hidden_on == "host":
        changes.append("hidden states kept in host memory")
    if sums_budget != options.regmean.sums_budget_bytes:
        before = options.regmean.sums_budget_bytes
        changes.append(f"regmean sums_budget_bytes {before} -> {sums_budget} (experts in groups of {group})")
    return tuple(changes)
