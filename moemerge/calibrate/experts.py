"""Routing-aware RegMean for MoE experts (and, optionally, every linear layer), inside the calibration walk.

RegMean (Jin et al., ICLR 2023) merges a linear map y = W x of K sources in closed form::

    W = (sum_i W_i G_i^a) (sum_i G_i^a)^-1,    G_i = X_i^T X_i,    G_i^a = a G_i + (1 - a) diag(G_i)

with X_i (n_i x in) source i's inputs to the map on its own data. It is the minimiser of
``sum_i a ||X_i (W - W_i)^T||^2 + (1 - a) ||(W - W_i) diag(G_i)^1/2||^2``: outputs matched on the
data, plus a pull towards each W_i that keeps directions the data does not reach near the sources.

Routing-aware, for the experts of an MoE layer: source i's Gram of expert e counts only the tokens
source i itself routes to e (top-k membership), in its own forward pass on its own domain's text.
gate and up read the expert's input x; down reads the hidden activation ``act(gate x) * up x``
computed with source i's own expert weights (through the experts module's own ``_apply_gate``, so
GPT-OSS's clamped swiglu is exact). Biases (GPT-OSS) are solved jointly: x gets a constant 1 column.

Variants (``RegMeanOptions.variant``; ``sequential`` is the default, measured in docs/EXPERTS.md):

- ``classic``: X_i from source i's own forward, as above.
- ``sequential``: inputs from the model being calibrated (earlier layers already calibrated; for the
  down projection, this layer's calibrated gate/up), targets from each source's own outputs, on the
  tokens source i routes to e: ``min sum_i a ||X_m,i W^T - T_i||^2 + (1 - a) ||(W - W_i) D_m,i^1/2||^2``
  with T_i the source expert's outputs, so ``W (a G_m + (1 - a) diag G_m) = sum_i a T_i^T X_m,i + (1 - a)
  W_i D_m,i``. It is classic when the two models see equal inputs.

Every source is folded into two running float64 sums per map as it streams (``RegMeanSums``,
moemerge/calibrate/regmean_sums.py), so the memory of the sums does not grow with K; per-batch products
run in ``work_dtype``. The merged layer's experts are held in their storage dtype (an ``ExpertBank``,
moemerge/calibrate/fused_experts.py), or read from disk when used where the memory plan has no room for
them, and the sources' are read one expert at a time, so a layer's experts exist at most once in memory,
whatever the group size. Each group's solved experts are written to the work folder as the on-disk tensors
they replace, as soon as they are solved, and the bank takes them from there: no whole layer of new experts
is ever held or serialised at once. An expert that no source routes at least ``min_tokens`` tokens to keeps
its stage-1 weights. docs/EXPERTS.md has the
decisions (routing weights, rank-deficient fallback, memory, costs) and measurements.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from moemerge.architectures.layout import ArchitectureError, ModelLayout, load_layout
from moemerge.calibrate.fused_experts import ExpertBank, FusedExperts, bank_of, expert_call, experts_module
from moemerge.calibrate.options import CalibrationOptions, RegMeanOptions
from moemerge.calibrate.regmean_sums import RegMeanSums, augment, fold_expert_batch
from moemerge.calibrate.stages import StageClock
from moemerge.calibrate.walk import LayerWalker, return_freed_memory
from moemerge.finite import check_finite, check_tensors

if TYPE_CHECKING:
    from moemerge.data import Batch

logger = logging.getLogger(__name__)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

_CONFIG_KEYS_IGNORED = {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_experts_implementation",
    "_attn_implementation_autoset",
}


# --------------------------------------------------------------------------------------------
# The walk: sources alongside the merged model
# --------------------------------------------------------------------------------------------


class DomainWalk(Protocol):
    """One domain of the merged model's walk: its source, batches and current hidden states."""

    name: str
    batches: list[Batch]
    hidden: list[Tensor]


class MergedWalk(Protocol):
    """What RegMean needs from the walk of the merged model (the runner's ``Calibrator`` has it).

    ``ranks`` (torch.distributed reductions) and ``hidden_device`` are optional: without them the
    sums are not reduced and hidden states are kept in host memory.
    """

    options: CalibrationOptions
    walker: LayerWalker
    layout: ModelLayout
    work_dir: Path
    domains: Sequence[DomainWalk]
    dtype: torch.dtype
    storage: torch.dtype


class _Stop(Exception):
    """Raised by a hook to end a layer forward once the statistics it needs are taken."""


def _own(module: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """Give `module` a private copy of parameter `name` before writing into it.

    A materialised parameter can share memory with the checkpoint reader's memory-mapped tensor (same
    dtype, no conversion), so writing into it in place would change what the reader returns later.
    """
    param = torch.nn.Parameter(module._parameters[name].detach().clone(), requires_grad=False)
    module._parameters[name] = param
    return param


def _check_config(source: str, config: Any, merged: Any) -> None:
    ours, theirs = config.to_dict(), merged.to_dict()
    for key in sorted(set(ours) | set(theirs)):
        if key not in _CONFIG_KEYS_IGNORED and ours.get(key) != theirs.get(key):
            raise ValueError(
                f"{source}/config.json: {key} = {ours.get(key)!r} differs from the merged model's "
                f"{theirs.get(key)!r}; the sources' layers are run with the merged model's layer inputs"
            )


class SourceWalk:
    """One source model run layer by layer on its own domain's calibration batches.

    Its decoder layers are materialised one at a time like the merged model's; the embeddings are
    used once for the layer-0 hidden states and then released. What each layer receives besides
    the hidden states (positions, masks) is taken from the merged model's walk (same config, same
    batches: checked).
    """

    def __init__(self, path: str, calibrator: MergedWalk, batches: list[Batch]):
        layout = load_layout(path)
        _check_config(path, layout.config, calibrator.layout.config)
        self.name = path
        self.walker = LayerWalker(
            path, layout, dtype=calibrator.dtype, device=str(calibrator.walker.device), experts="lazy", head=False
        )
        self.batches = batches
        store = getattr(calibrator, "hidden_device", torch.device("cpu"))
        self.hidden = [
            self.walker.layer_inputs(b.input_ids, b.attention_mask)[0][0].to(store, calibrator.storage) for b in batches
        ]
        keep = {id(p) for p in self.walker.layers.parameters()}
        for module in self.walker.model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) not in keep and not param.is_meta:
                    module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)


@dataclass
class _Task:
    """One pass over every domain: which experts, which projection, and whether it is the last."""

    experts: list[int]
    phase: str  # "both" (classic), "gate_up" or "down" (sequential)
    last: bool


class RegMeanCalibration:
    """Routing-aware RegMean of every MoE layer's experts (and with ``linear_layers: all`` every linear).

    Driven by the walk of the merged model (:class:`MergedWalk`, the runner's ``Calibrator``):
    ``run_layer(l, merged_layer)`` is called for every decoder layer before the router of that layer is
    solved; it advances every source by one layer and, for a layer with something to calibrate, solves,
    installs (cast to the checkpoint's dtype, as it will be saved) and saves the layer's new tensors to the
    work folder: experts in a bank group by group as their on-disk tensors
    (``layer_NNNN.regmean.experts.MATRIX.FIRST.safetensors``), everything else in the in-memory layout
    (``layer_NNNN.regmean.safetensors``, written last with the ``.json`` summary, which lists the group files).
    A finished layer is replayed from there. ``read(name)`` gives the output's replaced on-disk tensors (those
    in the in-memory layout converted back with transformers' own save-time conversion).
    """

    def __init__(self, calibrator: MergedWalk):
        self.calibrator = calibrator
        self.options: RegMeanOptions = calibrator.options.regmean
        self.walker = calibrator.walker
        self.layout = calibrator.layout
        self.work_dir = Path(calibrator.work_dir)
        self.work_dtype = getattr(torch, self.options.work_dtype)
        self.moe = {info.index: info for info in self.layout.moe_layers}
        ranks = getattr(calibrator, "ranks", None)
        self._reduce: Callable[[Tensor], Tensor] = ranks.reduce if ranks is not None else (lambda t: t)
        self._is_writer = ranks.is_writer if ranks is not None else True
        self._on_writer: Callable[[Callable], Any] = ranks.on_writer if ranks is not None else (lambda work: work())
        self._distributed = bool(ranks is not None and ranks.distributed)
        # every rank reads the experts it solves back from a file; rank 0's work folder may not be this rank's
        self._scratch = TemporaryDirectory(prefix="moemerge-regmean-") if not self._is_writer else None
        self.expert_files: dict[str, Path] = {}  # on-disk name -> the group file holding its new value
        self.sources = [SourceWalk(state.name, calibrator, state.batches) for state in calibrator.domains]
        self.replaced: dict[str, int] = {}  # on-disk name -> layer whose work file holds it
        self.summaries: dict[int, dict] = {}
        self.on_sums: Callable[[int, dict[str, Any]], None] | None = None
        """Test hook: (layer, {"phase": gate_up_proj or down_proj, "experts", "sums", "tokens"}) before a solve."""
        self._cache: tuple[int, dict[str, Tensor]] | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self.clock: StageClock = getattr(calibrator, "clock", None) or StageClock()

    # ---- the walk -------------------------------------------------------------------------

    def _file(self, index: int) -> Path:
        return self.work_dir / f"layer_{index:04d}.regmean.safetensors"

    def _own_folder(self) -> Path:
        """Where this rank writes the experts it solves: the work folder on rank 0, a scratch folder elsewhere."""
        return self.work_dir if self._scratch is None else Path(self._scratch.name)

    def _calibrates(self, index: int) -> bool:
        return index in self.moe or self.options.linear_layers == "all"

    def run_layer(self, index: int, merged_layer: torch.nn.Module) -> dict | None:
        """Calibrate (or replay) layer `index` of the merged model and advance every source past it."""
        from safetensors.torch import load_file

        if not self._calibrates(index):
            for source in self.sources:
                self._advance(source, index)
            return None
        done = self._file(index)

        def finished() -> tuple[dict[str, Tensor], dict] | None:
            if not done.exists():
                return None
            return load_file(str(done)), json.loads(done.with_suffix(".json").read_text())

        replay = self._on_writer(finished)  # rank 0's work folder, on every rank
        if replay is not None:
            tensors, summary = replay
            self._install(tensors)
            bank = self._bank(merged_layer, index)
            for name in summary["expert_files"]:
                self._rewrite(bank, self._finished_file(name))
            for source in self.sources:
                self._advance(source, index)
        else:
            tensors, summary = self._calibrate(index, merged_layer)
            if self._is_writer:
                with self.clock("write"):
                    self._save(done, tensors, summary)
        self.replaced.update({name: index for name in summary["replaced"]})
        self.summaries[index] = summary
        return {k: v for k, v in summary.items() if k not in ("replaced", "expert_files")}

    def _bank(self, merged_layer: torch.nn.Module, index: int) -> ExpertBank | None:
        """The bank holding layer `index`'s experts (None: a dense layer, or experts converted with the layer)."""
        if index not in self.moe:
            return None
        return bank_of(experts_module(merged_layer, f"{self.layout.layers_module}.{index}")[1])

    def _finished_file(self, name: str) -> Path:
        """A finished layer's group file on this rank: in rank 0's work folder, copied into this rank's scratch
        folder on the others (broadcast from rank 0: the work folder need not be shared)."""
        from safetensors.torch import load_file, save_file

        path = self.work_dir / name
        if not self._distributed:
            return path
        tensors = self._on_writer(partial(load_file, str(path)))
        if self._scratch is None:
            return path
        save_file(tensors, str(self._own_folder() / name))
        return self._own_folder() / name

    def _rewrite(self, bank: ExpertBank | None, file: Path) -> None:
        if bank is None:
            raise ValueError(f"{file}: new experts for a layer whose experts are not in a bank")
        names = bank.rewrite(file)
        if self._is_writer:
            self.expert_files.update(dict.fromkeys(names, file))

    def _layer_inputs(self, index: int, batch: Batch) -> dict:
        return self.walker.layer_inputs(batch.input_ids, batch.attention_mask)[index][1]

    def _forward(
        self,
        layer: torch.nn.Module,
        index: int,
        batches: list[Batch],
        hidden: list[Tensor],
        hooks: list[tuple[torch.nn.Module, Callable]],
        full: bool,
    ) -> list[Tensor] | None:
        """Run one domain through `layer`; hooks get (batch number, real-token mask, module, args, kwargs).

        With ``full`` False the forward ends (``_Stop``) right after the first hook, which must then be on
        the experts module: attention runs, the experts and whatever follows them do not.
        """
        device = self.walker.device
        store = getattr(self.calibrator, "hidden_device", torch.device("cpu"))
        outputs: list[Tensor] = []
        current: dict[str, Any] = {}
        handles = []
        for module, hook in hooks:

            def pre(module: torch.nn.Module, args: tuple, kwargs: dict, hook: Callable = hook) -> None:
                hook(current["b"], current["real"], module, args, kwargs)
                if not full:
                    raise _Stop

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                for b, (batch, h) in enumerate(zip(batches, hidden, strict=True)):
                    current.update(b=b, real=batch.attention_mask.reshape(-1).bool().to(device))
                    try:
                        out = layer(h.to(device, self.calibrator.dtype), **self._layer_inputs(index, batch))
                    except _Stop:
                        continue
                    check_finite(out, f"layer {index}: hidden states")
                    if full:
                        outputs.append(out.to(store, self.calibrator.storage))
        finally:
            for handle in handles:
                handle.remove()
        return_freed_memory()  # a pass frees many expert-sized temporaries that glibc would otherwise keep
        return outputs if full else None

    def _advance(self, source: SourceWalk, index: int) -> None:
        with self.clock("read source layers"):
            layer = source.walker.materialize(index)
        with self.clock("forward sources"):
            source.hidden = self._forward(layer, index, source.batches, source.hidden, [], full=True)
        source.walker.release(index)

    # ---- one layer ------------------------------------------------------------------------

    def _tasks(self, experts: int, per_expert_bytes: int) -> list[_Task]:
        budget = self.options.sums_budget_bytes
        chunk = experts if budget is None else max(1, min(experts, budget // max(per_expert_bytes, 1)))
        groups = [list(range(s, min(s + chunk, experts))) for s in range(0, experts, chunk)]
        phases = ["both"] if self.options.variant == "classic" else ["gate_up", "down"]
        tasks = [_Task(g, p, False) for g in groups for p in phases]
        tasks[-1].last = True
        return tasks

    def _calibrate(self, index: int, merged_layer: torch.nn.Module) -> tuple[dict[str, Tensor], dict]:
        start = time.perf_counter()
        opts = self.options
        device = self.walker.device
        prefix = f"{self.layout.layers_module}.{index}"
        info = self.moe.get(index)
        merged_fused = None
        tasks = [_Task([], "none", True)]
        written: list[str] = []  # group files of new experts in a bank
        changed: list[str] = []  # on-disk tensors in them that differ from stage 1
        if info is not None:
            name, module = experts_module(merged_layer, prefix)
            experts_name = f"{prefix}.{name}"
            bank = bank_of(module)
            if bank is None:  # a bank holds its own copy; a parameter may be the reader's mapped tensor
                for pname in FusedExperts(module).parameter_names():
                    _own(module, pname)
            elif self._is_writer:  # a group file left by an earlier, unfinished attempt at this layer
                for stale in self.work_dir.glob(f"layer_{index:04d}.regmean.experts.*"):
                    stale.unlink()
            merged_fused = FusedExperts(module)
            num_experts, inter2, d_in = merged_fused.shape("gate_up_proj")
            d_out, inter_in = merged_fused.shape("down_proj")[1:]
            per_expert = RegMeanSums.bytes_per_map(inter2, d_in) + RegMeanSums.bytes_per_map(d_out, inter_in)
            tasks = self._tasks(num_experts, per_expert)
            tokens = torch.zeros(len(self.sources), num_experts, dtype=torch.float64, device=device)
            calibrated: list[int] = []
            fallbacks = 0
        linears = self._linear_sums(merged_layer, prefix) if opts.linear_layers == "all" else {}
        for task in tasks:
            gate_up = down = None
            if task.phase in ("both", "gate_up"):
                gate_up = RegMeanSums.zeros(len(task.experts), inter2, d_in, opts.alpha, device)
            if task.phase in ("both", "down"):
                down = RegMeanSums.zeros(len(task.experts), d_out, inter_in, opts.alpha, device)
            for k, source in enumerate(self.sources):
                with self.clock("read source layers"):
                    layer = source.walker.materialize(index)
                hooks = []
                merged_inputs = None
                if task.experts:
                    if opts.variant == "sequential":
                        with self.clock("forward merged"):
                            merged_inputs = self._merged_expert_inputs(merged_layer, index, k)
                    _, source_module = experts_module(layer, f"{source.name}: {prefix}")
                    fold = self._expert_fold(
                        k, task, FusedExperts(source_module), gate_up, down, tokens, merged_inputs, merged_fused
                    )
                    hooks.append((source_module, fold))
                if task.last and linears:
                    hooks += self._linear_hooks(layer, linears, prefix)
                with self.clock("forward sources"):
                    outputs = self._forward(layer, index, source.batches, source.hidden, hooks, full=task.last)
                if task.last:
                    source.hidden = outputs
                source.walker.release(index)
                del merged_inputs
            if not task.experts:
                continue
            ids = torch.tensor(task.experts, device=device)
            enough = self._reduce(tokens.clone())[:, ids].amax(0) >= opts.min_tokens
            for sums, pname in ((gate_up, "gate_up_proj"), (down, "down_proj")):
                if sums is None:
                    continue
                sums.reduce(self._reduce)
                if self.on_sums is not None:
                    self.on_sums(index, {"phase": pname, "experts": task.experts, "sums": sums, "tokens": tokens})
                # each (expert, matrix) is written once, after its own solve: the module still holds stage 1 here
                stage1 = torch.stack([merged_fused.matrix(pname, e).detach() for e in task.experts])
                with self.clock("expert solves"):
                    solution, fell_back = sums.solve(stage1)
                del stage1
                fallbacks += int((fell_back & enough).sum())
                solved = [(e, solution[j]) for j, e in enumerate(task.experts) if enough[j]]
                if bank is None:
                    for e, matrix in solved:
                        merged_fused.set(pname, e, self._as_saved(f"{experts_name}.{pname}", matrix))
                    del solution, solved  # in the module now
                    continue
                new = {n: t for e, matrix in solved for n, t in bank.on_disk(pname, e, matrix).items()}
                first = solved[0][0] if solved else None
                del solution, solved  # copied as stored: the group file is written without them
                if new:
                    with self.clock("write"):
                        file, differ = self._write_experts(index, bank, f"{pname}.{first:04d}", new)
                    written.append(file.name)
                    changed += differ
                del new
            if task.phase != "down":
                calibrated += [e for j, e in enumerate(task.experts) if enough[j]]
            # nothing of this task outlives it: the next one allocates its sums beside none of these (group_bytes)
            del fold, hooks, sums
            gate_up = down = None
        tensors: dict[str, Tensor] = {}
        summary: dict[str, Any] = {"seconds": 0.0}
        if info is not None:
            tokens = self._reduce(tokens)
            if bank is None:
                tensors.update({f"{experts_name}.{n}": merged_fused.tensor(n) for n in merged_fused.parameter_names()})
            summary["experts"] = {
                "calibrated": len(calibrated),
                "kept_stage1": num_experts - len(calibrated),
                "min_tokens": opts.min_tokens,
                "fallbacks": fallbacks,
                "variant": opts.variant,
                "passes": len(tasks),
                "tokens": {s.name: _token_stats(tokens[k]) for k, s in enumerate(self.sources)},
            }
        if linears:
            summary["linears"] = self._solve_linears(merged_layer, prefix, linears, tensors)
        tensors = {n: t.detach().to(self._disk_dtype(n)).cpu().contiguous() for n, t in tensors.items()}
        check_tensors(tensors, f"layer {index}: solved")
        summary["replaced"] = sorted(self._changed(tensors) + changed)
        summary["expert_files"] = written
        summary["seconds"] = round(time.perf_counter() - start, 4)
        return tensors, summary

    def _write_experts(
        self, index: int, bank: ExpertBank, group: str, tensors: dict[str, Tensor]
    ) -> tuple[Path, list[str]]:
        """Write a group's solved experts, as the on-disk tensors they replace, to this rank's folder (on rank 0
        the work folder, where a resumed run finds them) and hand them to the bank. Returns the file and the
        tensors in it that differ from stage 1."""
        from safetensors.torch import save_file

        check_tensors(tensors, f"layer {index}: solved")
        reader = self.walker.reader
        changed = [n for n, t in tensors.items() if not torch.equal(t, reader.read(n))]
        file = self._own_folder() / f"layer_{index:04d}.regmean.experts.{group}.safetensors"
        tmp = file.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(file)
        self._rewrite(bank, file)
        return file, changed

    def _merged_expert_inputs(self, merged_layer: torch.nn.Module, index: int, k: int) -> list[Tensor]:
        """Expert inputs of domain k's real tokens in the model being calibrated (one tensor per batch)."""
        _, module = experts_module(merged_layer, f"{self.layout.layers_module}.{index}")
        captured: list[Tensor] = []

        def take(b: int, real: Tensor, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = expert_call(module, args, kwargs)[0]
            captured.append(x.reshape(-1, x.shape[-1])[real])

        state = self.calibrator.domains[k]
        self._forward(merged_layer, index, state.batches, state.hidden, [(module, take)], full=False)
        return captured

    def _expert_fold(
        self,
        k: int,
        task: _Task,
        source: FusedExperts,
        gate_up: RegMeanSums | None,
        down: RegMeanSums | None,
        tokens: Tensor,
        merged_inputs: list[Tensor] | None,
        merged: FusedExperts,
    ) -> Callable:
        """The experts pre-hook of source k that folds one batch into the task's sums."""
        wd = self.work_dtype
        weights_source = source.weights(wd)
        weights_merged = merged.weights(wd) if task.phase == "down" else None

        def fold(b: int, real: Tensor, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x, index, weights = expert_call(module, args, kwargs)
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] != real.shape[0]:
                raise ValueError(f"{source.module}: experts saw {x.shape[0]} rows for {real.shape[0]} positions")
            with self.clock("expert sums"):
                fold_expert_batch(
                    task.experts,
                    x[real].to(wd),
                    index.reshape(-1, index.shape[-1])[real],
                    weights.reshape(-1, weights.shape[-1])[real].to(wd),
                    weights_source,
                    gate_up,
                    down,
                    tokens[k] if task.phase != "down" else None,
                    merged_x=merged_inputs[b].to(wd) if merged_inputs is not None else None,
                    merged=weights_merged,
                    routing_weight=self.options.routing_weight,
                )

        return fold

    # ---- every other linear layer (linear_layers: all) -----------------------------------

    def _linear_sums(self, merged_layer: torch.nn.Module, prefix: str) -> dict[str, RegMeanSums]:
        skip = []
        info = self.moe.get(int(prefix.rsplit(".", 1)[-1]))
        if info is not None:
            skip.append(info.router_module[len(prefix) + 1 :])
        sums = {}
        for name, module in merged_layer.named_modules():
            if not isinstance(module, torch.nn.Linear) or module.weight.numel() == 0:
                continue  # a zero-width map (GLM-4-MoE with n_shared_experts 0) has nothing to solve
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            bias = module.bias is not None
            sums[name] = RegMeanSums.zeros(
                1, module.out_features, module.in_features + bias, self.options.alpha, self.walker.device
            )
        return sums

    def _linear_hooks(
        self, layer: torch.nn.Module, sums: dict[str, RegMeanSums], prefix: str
    ) -> list[tuple[torch.nn.Module, Callable]]:
        return [
            (layer.get_submodule(n), self._linear_fold(f"{prefix}.{n}", layer.get_submodule(n), s))
            for n, s in sums.items()
        ]

    def _linear_fold(self, name: str, linear: torch.nn.Linear, sums: RegMeanSums) -> Callable:
        """The pre-hook of one source linear that folds every real token's input into its sums."""
        wd = self.work_dtype
        bias = linear.bias is not None
        weight = linear.weight if not bias else torch.cat([linear.weight, linear.bias[:, None]], dim=1)
        weight = weight.detach().to(wd)

        def fold(b: int, real: Tensor, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = (args[0] if args else kwargs["input"]).reshape(-1, linear.in_features)
            if x.shape[0] != real.shape[0]:
                raise ValueError(f"{name}: {x.shape[0]} input rows for {real.shape[0]} token positions")
            x = augment(x[real].to(wd), bias)
            sums.fold(0, x, x @ weight.T, weight)

        return fold

    def _solve_linears(
        self, merged_layer: torch.nn.Module, prefix: str, sums: dict[str, RegMeanSums], tensors: dict[str, Tensor]
    ) -> dict:
        fallbacks = 0
        for name, target in sums.items():
            module = merged_layer.get_submodule(name)
            bias = module.bias is not None
            stage1 = module.weight if not bias else torch.cat([module.weight, module.bias[:, None]], dim=1)
            target.reduce(self._reduce)
            solution, fell_back = target.solve(stage1.detach()[None])
            fallbacks += int(fell_back.sum())
            with torch.no_grad():
                full = f"{prefix}.{name}"
                _own(module, "weight")
                module.weight.copy_(self._as_saved(f"{full}.weight", solution[0][:, : module.in_features]))
                tensors[f"{full}.weight"] = module.weight
                if bias:
                    _own(module, "bias")
                    module.bias.copy_(self._as_saved(f"{full}.bias", solution[0][:, -1]))
                    tensors[f"{full}.bias"] = module.bias
        return {"calibrated": len(sums), "fallbacks": fallbacks}

    # ---- tensors: as saved, installed, written ------------------------------------------

    def _disk_names(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(self.walker.model, dict(tensors))
        missing = sorted(set(reverted) - set(self.walker.reader.names()))
        if missing:
            raise ArchitectureError(
                f"{self.walker.reader.model_dir}: RegMean's tensor {missing[0]} (from transformers' save-time "
                "conversion) is not in the stage-1 checkpoint"
            )
        return reverted

    def _disk_dtype(self, name: str) -> torch.dtype:
        if name not in self._dtypes:
            param = self.walker.model.get_parameter(name)
            probe = self._disk_names({name: torch.empty(param.shape, dtype=param.dtype, device="meta")})
            self._dtypes[name] = _DTYPES[self.walker.reader.info(next(iter(probe))).dtype]
        return self._dtypes[name]

    def _as_saved(self, name: str, value: Tensor) -> Tensor:
        """`value` as the checkpoint will hold it (its on-disk dtype), back in the forward dtype."""
        return value.to(self._disk_dtype(name)).to(self.calibrator.dtype)

    def _changed(self, tensors: dict[str, Tensor]) -> list[str]:
        reader = self.walker.reader
        return sorted(n for n, t in self._disk_names(tensors).items() if not torch.equal(t, reader.read(n)))

    def _install(self, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            owner, _, attr = name.rpartition(".")
            module = self.walker.model.get_submodule(owner)
            param = module._parameters[attr]
            module._parameters[attr] = torch.nn.Parameter(tensor.to(param.device, param.dtype), requires_grad=False)

    def _save(self, done: Path, tensors: dict[str, Tensor], summary: dict) -> None:
        from safetensors.torch import save_file

        tmp = done.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        done.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        tmp.rename(done)

    def __contains__(self, name: str) -> bool:
        return name in self.replaced

    def read(self, name: str) -> Tensor:
        """A replaced on-disk tensor of the output (its layer's work file, converted back to on-disk names)."""
        from safetensors.torch import load_file

        if name in self.expert_files:
            from safetensors import safe_open

            with safe_open(str(self.expert_files[name]), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        index = self.replaced[name]
        if self._cache is None or self._cache[0] != index:
            self._cache = (index, self._disk_names(load_file(str(self._file(index)))))
        return self._cache[1][name]

    def report(self) -> dict:
        """Options and per-layer summaries for the output's calibration report."""
        return {
            "options": self.options.model_dump(mode="json"),
            "layers": {
                str(i): {k: v for k, v in s.items() if k not in ("replaced", "expert_files")}
                for i, s in self.summaries.items()
            },
            "replaced_tensors": len(self.replaced),
        }


def _token_stats(counts: Tensor) -> dict[str, float]:
    values = counts.tolist()
    return {
        "total": int(sum(values)),
        "min": int(min(values)),
        "median": float(statistics.median(values)),
        "max": int(max(values)),
        "zero": sum(1 for v in values if v == 0),
    }
