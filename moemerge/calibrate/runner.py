"""Stage 2: walk the stage-1 model layer by layer and re-solve every router with HARC.

For each decoder layer in order: materialise it from the merged checkpoint, run every domain's
calibration batches through it while recording the router input of each real (non-padding)
token, solve the router (`solve_router`), install the router *as it will be saved* (cast to the
checkpoint's dtype), run the layer again to produce the next layer's input, and release it. Dense
layers are just run. Each solved layer is written to a work folder as soon as it is done, so a
killed run resumes from the last finished layer (finished layers are replayed, not re-solved) and
ends bit-identical to an uninterrupted run.

Memory: the hidden states of all calibration sequences (tokens x d, in `activation_dtype`, padding
included), one layer's weights, and for the layer being solved the router inputs of every real
token (N x d) plus the solver's state (a few E x d matrices; E x d^2 with the `block`
preconditioner).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moemerge.architectures.layout import ModelLayout, MoeLayer, load_layout
from moemerge.architectures.routing import top_k_agreement, top_k_experts
from moemerge.calibrate.experts import RegMeanCalibration
from moemerge.calibrate.memory import (
    MemoryPlan,
    MemoryPlanError,
    ModelShape,
    parse_budget,
    plan_memory,
    process_held_bytes,
)
from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.solve import solve_router
from moemerge.calibrate.stages import StageClock
from moemerge.calibrate.walk import LayerWalker
from moemerge.checkpoint.card import model_card
from moemerge.checkpoint.hub import provenance
from moemerge.checkpoint.lock import folder_lock
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter, disk_errors
from moemerge.data import Batch, DataSpec, TokenizedDomain, batches, identity, load_domain, parse_data_source
from moemerge.distributed import Ranks, init_ranks, world_size_from_env
from moemerge.finite import check_finite, check_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUMMARY_FILE = "moemerge_calibration.json"

RouterInputsCallback = Callable[[int, list[torch.Tensor]], None]


@dataclass(frozen=True)
class Domain:
    """One source model and the calibration text of its domain."""

    source: str
    files: tuple[str | DataSpec, ...]  # files or Hub dataset splits (moemerge.data.spec)


@dataclass
class _DomainState:
    name: str
    source: CheckpointReader
    batches: list[Batch]
    hidden: list[torch.Tensor]


def _checkpoint_stamp(model_dir: str) -> list:
    """Path, size and modification time of each file of a model folder: a rebuilt checkpoint differs.

    Hashing the weights themselves would read every byte of a large model before any work starts.
    """
    folder = Path(model_dir).resolve()
    return [str(folder)] + [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    ]


WORK_FORMAT = 2
"""Layout of a work folder's files; a folder written in another one is not resumed (2: RegMean's experts in a bank
are written group by group as on-disk tensors)."""


def _fingerprint(merged: str, domains: list[Domain], options: CalibrationOptions) -> str:
    """What a work folder's finished layers depend on: checkpoints, options, calibration text and its layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps([WORK_FORMAT, _checkpoint_stamp(merged), options.model_dump(mode="json")]).encode())
    for domain in domains:
        digest.update(json.dumps(_checkpoint_stamp(domain.source)).encode())
        for file in domain.files:
            digest.update(identity(parse_data_source(file)))
    return digest.hexdigest()


def _prepare_work_dir(work_dir: Path, fingerprint: str) -> None:
    stamp = work_dir / "fingerprint.txt"
    if stamp.exists() and stamp.read_text() != fingerprint:
        raise ValueError(
            f"{work_dir}: holds a calibration of other inputs or options (or of another moemerge version); "
            "remove it or pick another"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)


def _check_sources(layout: ModelLayout, domains: list[Domain]) -> None:
    for domain in domains:
        source = load_layout(domain.source)
        if source.family != layout.family or source.router_tensors != layout.router_tensors:
            raise ValueError(f"{domain.source}: its MoE layout (family, router tensors) differs from the merged model")


def _plan(
    layout: ModelLayout,
    reader: CheckpointReader,
    domains: list[Domain],
    tokenizer: PreTrainedTokenizerBase,
    options: CalibrationOptions,
    world_size: int,
    on_gpu: bool,
    stored_as: str | None,
) -> tuple[MemoryPlan, list[TokenizedDomain]]:
    """The memory plan of calibrating the model `reader` reads (``stored_as``: once written in that dtype) on
    the domains' text, and that text tokenised; raises :class:`MemoryPlanError` when no plan fits the budget."""
    _check_sources(layout, domains)
    calibrations = [load_domain(d.source, d.files, tokenizer, options.data)[0] for d in domains]
    plan = plan_memory(
        ModelShape.of(layout, reader, stored_as),
        [[len(sample) for sample in c.samples] for c in calibrations],
        options,
        parse_budget(options.max_memory, options.device),
        world_size=world_size,
        on_gpu=on_gpu,
        held_bytes=process_held_bytes(),
    )
    return plan, calibrations


def plan_calibration(
    model: str,
    domains: list[Domain],
    options: CalibrationOptions,
    *,
    tokenizer_source: str | None = None,
    stored_as: str | None = None,
    progress: bool = True,
) -> MemoryPlan:
    """The memory plan of calibrating ``model``, or of a stage-1 output not written yet: give the base model,
    the tokenizer the output will carry and the dtype it will be written in, so that `moemerge run` refuses a
    budget that cannot be met before stage 1 (the stage-1 output has the base model's tensors and shapes).

    Raises :class:`MemoryPlanError` (the smallest plan printed first when ``progress``) when nothing fits.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or model, trust_remote_code=False)
    reader = CheckpointReader(model)
    try:
        on_gpu = options.device.startswith("cuda")
        plan, _ = _plan(
            load_layout(model), reader, domains, tokenizer, options, world_size_from_env(), on_gpu, stored_as
        )
    except MemoryPlanError as err:
        if progress:
            print(err.plan.describe(), file=sys.stderr)
        raise
    return plan


Router = tuple[torch.Tensor, torch.Tensor | None]


def _agreement_sums(
    x: torch.Tensor, reference: Router, candidates: list[Router], info: MoeLayer, kind, selection, batch: int = 4096
) -> torch.Tensor:
    """float64 [tokens, sum over tokens of each candidate's top-k agreement with the reference], on x's device.

    Sums rather than means, so that ranks holding different tokens add them up (``Ranks.reduce``).
    """

    def here(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(x.device, torch.float32)

    def logits(xb: torch.Tensor, router: Router) -> torch.Tensor:
        w, b = router
        return xb @ w.T + (b if b is not None else 0)

    reference = (here(reference[0]), here(reference[1]))
    candidates = [(here(w), here(b)) for w, b in candidates]
    selection = here(selection)
    sums = torch.zeros(1 + len(candidates), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch].float()
        ref = top_k_experts(logits(xb, reference), kind, info.top_k, selection)
        sums[0] += xb.shape[0]
        for j, candidate in enumerate(candidates, start=1):
            cand = top_k_experts(logits(xb, candidate), kind, info.top_k, selection)
            sums[j] += top_k_agreement(ref, cand, info.num_experts).sum(dtype=torch.float64)
    return sums


def _read_layer(done: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A finished layer's router tensors and summary from the work folder, or None."""
    from safetensors.torch import load_file

    if not done.exists():
        return None
    return load_file(str(done)), json.loads(done.with_suffix(".json").read_text())


class Calibrator:
    """One HARC calibration run of a merged model against its sources."""

    def __init__(
        self,
        merged: str,
        domains: list[Domain],
        options: CalibrationOptions,
        work_dir: Path,
        ranks: Ranks | None = None,
    ):
        """Distributed (torchrun, or ``ranks`` given), this rank keeps its share of every domain's batches."""
        from transformers import AutoTokenizer

        self.merged = merged
        self.ranks = ranks or init_ranks(options.device)
        self.layout = load_layout(merged)
        tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=False)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.plan, calibrations = _plan(  # before any work: a budget that cannot be met stops here
            self.layout,
            CheckpointReader(merged),
            domains,
            tokenizer,
            options,
            self.ranks.world_size,
            self.ranks.device.type == "cuda",
            stored_as=None,
        )
        self.data_report = {d.source: c.report for d, c in zip(domains, calibrations, strict=True)}
        options = self.options = self.plan.apply(options)
        self.work_dir = work_dir
        self.ranks.on_writer(lambda: _prepare_work_dir(work_dir, _fingerprint(merged, domains, options)))
        self.dtype = getattr(torch, options.forward_dtype)
        self.storage = getattr(torch, options.activation_dtype)
        self.hidden_device = torch.device("cpu") if self.plan.hidden_on == "host" else self.ranks.device
        self.walker = LayerWalker(  # experts in a bank, in their storage dtype: held, or read when used
            merged,
            self.layout,
            dtype=self.dtype,
            device=str(self.ranks.device),
            experts=self.plan.merged_bank,
            head=False,
        )
        self.domains = []
        for domain, calibration in zip(domains, calibrations, strict=True):
            domain_batches = list(batches(calibration, options.batch_tokens, pad_id))
            if len(domain_batches) < self.ranks.world_size:  # small data: a sample per batch, so every rank gets some
                domain_batches = list(batches(calibration, 1, pad_id))
            sizes = [int(b.attention_mask.sum()) for b in domain_batches]
            domain_batches = self.ranks.shard(domain_batches, sizes, domain.source)
            hidden = [
                self.walker.layer_inputs(b.input_ids, b.attention_mask)[0][0].to(self.hidden_device, self.storage)
                for b in domain_batches
            ]
            self.domains.append(_DomainState(domain.source, CheckpointReader(domain.source), domain_batches, hidden))
        self.solved: dict[str, torch.Tensor] = {}
        self.summaries: list[dict] = []
        self.clock = StageClock()
        self.regmean = RegMeanCalibration(self) if options.experts else None  # experts before routers

    def _layer_file(self, index: int) -> Path:
        return self.work_dir / f"layer_{index:04d}.safetensors"

    def _run_layer(self, layer: torch.nn.Module, index: int, state: _DomainState, record: MoeLayer | None):
        """Run the layer over a domain's batches; return router inputs of real tokens if `record`."""
        captured: list[torch.Tensor] = []
        handle = None
        if record is not None:
            router = self.walker.model.get_submodule(record.router_module)

            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                captured.append(x.reshape(-1, x.shape[-1]))

            handle = router.register_forward_pre_hook(hook, with_kwargs=True)
        outputs = []
        try:
            with torch.no_grad():
                for batch, hidden in zip(state.batches, state.hidden, strict=True):
                    kwargs = self.walker.layer_inputs(batch.input_ids, batch.attention_mask)[index][1]
                    out = layer(hidden.to(self.walker.device, self.dtype), **kwargs)
                    check_finite(out, f"layer {index}: hidden states of {state.name}'s calibration text")
                    outputs.append(out.to(self.hidden_device, self.storage))
                    if record is not None:
                        real = batch.attention_mask.reshape(-1).bool().to(self.walker.device)
                        captured[-1] = captured[-1][real].to(self.storage)
        finally:
            if handle is not None:
                handle.remove()
        return outputs, (torch.cat(captured) if record is not None else None)

    def _solve(self, info: MoeLayer, router_inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        reader = self.walker.reader
        merged_w = reader.read(info.router_weight).to(torch.float32)
        merged_b = reader.read(info.router_bias).to(torch.float32) if info.router_bias else None
        source_w = [s.source.read(info.router_weight).to(torch.float32) for s in self.domains]
        source_b = (
            [s.source.read(info.router_bias).to(torch.float32) for s in self.domains] if info.router_bias else None
        )
        for state, weight in zip(self.domains, source_w, strict=True):  # HARC would solve around an Inf silently
            check_finite(weight, f"{state.name}: router tensor {info.router_weight}")
        start = time.perf_counter()
        solution = solve_router(
            [x.to(self.walker.device) for x in router_inputs],
            [w.to(self.walker.device) for w in source_w],
            merged_w.to(self.walker.device),
            kind=self.layout.router_kind.value,
            source_biases=[b.to(self.walker.device) for b in source_b] if source_b else None,
            merged_bias=merged_b.to(self.walker.device) if merged_b is not None else None,
            options=self.options.harc,
            reduce=self.ranks.reduce,
        )
        saved = {info.router_weight: solution.weight.cpu().to(reader.read(info.router_weight).dtype)}
        self.ranks.check_same(solution.weight, f"layer {info.index} router")
        if info.router_bias:
            saved[info.router_bias] = solution.bias.cpu().to(reader.read(info.router_bias).dtype)
        check_tensors(saved, f"layer {info.index}: solved router")
        summary = {
            "layer": info.index,
            "seconds": round(time.perf_counter() - start, 4),
            "iterations": solution.stats.iterations,
            "relative_residual": solution.stats.relative_residual,
            "converged": solution.stats.converged,
            "preconditioner": solution.stats.preconditioner,
            "domains": {},
        }
        new_w = saved[info.router_weight].float()
        new_b = saved[info.router_bias].float() if info.router_bias else None
        kind = self.layout.router_kind
        for i, (state, x) in enumerate(zip(self.domains, router_inputs, strict=True)):
            selection = state.source.read(info.selection_bias) if info.selection_bias else None
            reference = (source_w[i], source_b[i] if source_b else None)
            sums = _agreement_sums(
                x.to(self.walker.device), reference, [(merged_w, merged_b), (new_w, new_b)], info, kind, selection
            )
            tokens, before, after = self.ranks.reduce(sums).tolist()  # every rank's tokens
            summary["domains"][state.name] = {
                "tokens": int(tokens),
                "agreement_before": before / tokens,
                "agreement_after": after / tokens,
            }
        return saved, summary

    def _install(self, info: MoeLayer, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            param = self.walker.model.get_parameter(info.router_weight_in_memory)
            param.copy_(tensors[info.router_weight].to(param.dtype))
            if info.router_bias:
                bias = self.walker.model.get_parameter(info.router_bias_in_memory)
                bias.copy_(tensors[info.router_bias].to(bias.dtype))

    def run(self, progress: bool = True, on_router_inputs: RouterInputsCallback | None = None) -> None:
        """Calibrate every MoE layer in order; `on_router_inputs(layer, [X_i])` sees what each solve used."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        moe = {info.index: info for info in self.layout.moe_layers}
        bar = progress and self.ranks.is_writer
        for index in tqdm(range(self.layout.num_layers), desc="calibrating layers", disable=not bar):
            self.clock.layer = index
            with self.clock("read merged layer"):
                layer = self.walker.materialize(index)
            info = moe.get(index)
            regmean = self.regmean.run_layer(index, layer) if self.regmean is not None else None
            done = self._layer_file(index)
            if info is not None and self.options.routers:
                finished = self.ranks.on_writer(partial(_read_layer, done))  # rank 0's work folder, on every rank
                if finished is not None:
                    tensors, summary = finished
                else:
                    inputs = []
                    for state in self.domains:
                        with self.clock("forward merged"):
                            _, x = self._run_layer(layer, index, state, info)
                        inputs.append(x)
                    if on_router_inputs is not None:
                        on_router_inputs(index, inputs)
                    with self.clock("router solve"):
                        tensors, summary = self._solve(info, inputs)
                    if regmean is not None:
                        summary["regmean"] = regmean
                    if self.ranks.is_writer:
                        with self.clock("write"):
                            save_file(tensors, str(done.with_suffix(".tmp")))
                        done.with_suffix(".json").write_text(json.dumps(summary, indent=1))
                        done.with_suffix(".tmp").rename(done)
                self._install(info, tensors)
                self.solved.update(tensors)
                self.summaries.append(summary)
                logger.info("layer %d: %s", index, json.dumps(summary))
            for state in self.domains:
                with self.clock("forward merged"):
                    state.hidden, _ = self._run_layer(layer, index, state, None)
            self.walker.release(index)
            if info is not None and self.options.routers:
                self.summaries[-1]["stages"] = self.clock.of(index)  # seconds per stage (stages.py)

    def write(self, out_dir: Path, overwrite: bool, card: str | None = None) -> Path:
        """OUT = merged model with every solved tensor replaced; every other tensor copied bit-identically.

        `card` replaces the default model card (stage-1 RegMean writes its own). Distributed, rank 0
        writes (atomically) and the other ranks wait for it and share its outcome.
        """
        return self.ranks.on_writer(partial(self._write, out_dir, overwrite, card))

    def describe(self) -> str:
        """What this run changes, in one sentence for the model card."""
        solved = [
            "every MoE router re-solved by HARC" if self.options.routers else "",
            "its experts merged by routing-aware RegMean" if self.regmean is not None else "",
        ]
        if self.regmean is not None and self.options.regmean.linear_layers == "all":
            solved[1] = "every linear layer of its decoder layers merged by RegMean (experts routing-aware)"
        return f"Model `{self.merged}` with " + " and ".join(s for s in solved if s) + "."

    def _write(self, out_dir: Path, overwrite: bool, card: str | None) -> Path:
        reader = self.walker.reader
        peak = self.clock.peak()
        with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
            for name in reader.names():
                if name in self.solved:
                    writer.add(name, self.solved[name])
                else:
                    in_regmean = self.regmean is not None and name in self.regmean
                    writer.add(name, self.regmean.read(name) if in_regmean else reader.read(name))
            writer.copy_support_files(self.merged)
            report = {
                "merged": self.merged,
                "sources": [d.name for d in self.domains],
                "provenance": {m: provenance(m) for m in [self.merged, *(d.name for d in self.domains)]},
                "data": self.data_report,
                "options": self.options.model_dump(mode="json"),
                "layers": self.summaries,
                "memory": {  # the plan beside what the walk held (this process; stages.py measures it)
                    "planned_peak_host_gb": round(self.plan.host_bytes / 1e9, 3),
                    "planned_peak_device_gb": round(self.plan.device_bytes / 1e9, 3) if self.plan.on_gpu else None,
                    "measured_peak_rss_anon_gb": None if peak is None else round(peak / 1e9, 3),
                    "plan": self.plan.describe().splitlines(),
                },
            }
            if self.regmean is not None:
                report["regmean"] = self.regmean.report()
            writer.write_text(SUMMARY_FILE, json.dumps(report, indent=1))
            card = card or model_card(
                recipe=json.dumps({"calibrate": self.options.model_dump(mode="json")}, indent=1),
                sources=[d.name for d in self.domains],
                base=None,
                summary=self.describe(),
            )
            writer.write_text("README.md", card)
            return writer.finalize(expected=set(reader.names()))


def calibrate(
    merged: str,
    domains: list[Domain],
    out_dir: str | Path,
    options: CalibrationOptions | None = None,
    *,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    card: str | None = None,
) -> Path:
    """Write `out_dir` = `merged` re-solved on the domains' text: routers by HARC, experts by RegMean if asked.

    `card`: the output's model card, when the caller describes the run itself (stage-1 RegMean).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: output exists; pass overwrite to replace it")
    work = Path(work_dir) if work_dir else out_dir.parent / f"{out_dir.name}.work"
    with folder_lock(out_dir), folder_lock(work):  # a second run into either is refused, naming this one
        try:
            calibrator = Calibrator(merged, domains, options or CalibrationOptions(), work)
        except MemoryPlanError as err:  # stopped before any work: say what the smallest plan would have held
            if progress:
                print(err.plan.describe(), file=sys.stderr)
            raise
        logger.info("%s", calibrator.plan.describe())
        if progress and calibrator.ranks.is_writer:
            print(calibrator.plan.describe(), file=sys.stderr)
        with disk_errors(work, "finished layers are kept: rerun to resume"):
            calibrator.run(progress=progress)
        return calibrator.write(out_dir, overwrite, card)
