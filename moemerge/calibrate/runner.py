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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moemerge.architectures.layout import ModelLayout, MoeLayer, load_layout
from moemerge.architectures.routing import top_k_agreement, top_k_experts
from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.solve import solve_router
from moemerge.calibrate.walk import LayerWalker
from moemerge.checkpoint.card import model_card
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.data import Batch, batches, load_domain

logger = logging.getLogger(__name__)

SUMMARY_FILE = "moemerge_calibration.json"

RouterInputsCallback = Callable[[int, list[torch.Tensor]], None]


@dataclass(frozen=True)
class Domain:
    """One source model and the calibration text of its domain."""

    source: str
    files: tuple[str, ...]


@dataclass
class _DomainState:
    name: str
    source: CheckpointReader
    batches: list[Batch]
    hidden: list[torch.Tensor]


def _fingerprint(merged: str, domains: list[Domain], options: CalibrationOptions) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([str(Path(merged).resolve()), options.model_dump(mode="json")]).encode())
    for domain in domains:
        digest.update(str(Path(domain.source).resolve()).encode())
        for file in domain.files:
            digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def _prepare_work_dir(work_dir: Path, fingerprint: str) -> None:
    stamp = work_dir / "fingerprint.txt"
    if stamp.exists() and stamp.read_text() != fingerprint:
        raise ValueError(f"{work_dir}: holds a calibration of other inputs or options; remove it or pick another")
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)


def _check_sources(layout: ModelLayout, domains: list[Domain]) -> None:
    for domain in domains:
        source = load_layout(domain.source)
        if source.family != layout.family or source.router_tensors != layout.router_tensors:
            raise ValueError(f"{domain.source}: its MoE layout (family, router tensors) differs from the merged model")


def _agreement(x: torch.Tensor, reference: torch.Tensor, candidate: torch.Tensor, info: MoeLayer, kind, bias):
    ref = top_k_experts(reference, kind, info.top_k, bias)
    cand = top_k_experts(candidate, kind, info.top_k, bias)
    return top_k_agreement(ref, cand, info.num_experts).mean().item()


class Calibrator:
    """One HARC calibration run of a merged model against its sources."""

    def __init__(self, merged: str, domains: list[Domain], options: CalibrationOptions, work_dir: Path):
        from transformers import AutoTokenizer

        self.merged = merged
        self.options = options
        self.layout = load_layout(merged)
        _check_sources(self.layout, domains)
        self.work_dir = work_dir
        _prepare_work_dir(work_dir, _fingerprint(merged, domains, options))
        self.dtype = getattr(torch, options.forward_dtype)
        self.storage = getattr(torch, options.activation_dtype)
        self.walker = LayerWalker(merged, self.layout, dtype=self.dtype, device=options.device)
        tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=False)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.domains = []
        for domain in domains:
            calibration, _ = load_domain(domain.source, domain.files, tokenizer, options.data)
            domain_batches = list(batches(calibration, options.batch_tokens, pad_id))
            hidden = [
                self.walker.layer_inputs(b.input_ids, b.attention_mask)[0][0].to(self.storage) for b in domain_batches
            ]
            self.domains.append(_DomainState(domain.source, CheckpointReader(domain.source), domain_batches, hidden))
        self.solved: dict[str, torch.Tensor] = {}
        self.summaries: list[dict] = []

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
                    outputs.append(out.to(self.storage))
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
        start = time.perf_counter()
        solution = solve_router(
            [x.to(self.walker.device) for x in router_inputs],
            [w.to(self.walker.device) for w in source_w],
            merged_w.to(self.walker.device),
            kind=self.layout.router_kind.value,
            source_biases=[b.to(self.walker.device) for b in source_b] if source_b else None,
            merged_bias=merged_b.to(self.walker.device) if merged_b is not None else None,
            options=self.options.harc,
        )
        saved = {info.router_weight: solution.weight.cpu().to(reader.read(info.router_weight).dtype)}
        if info.router_bias:
            saved[info.router_bias] = solution.bias.cpu().to(reader.read(info.router_bias).dtype)
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
            x = x.float()
            selection = state.source.read(info.selection_bias) if info.selection_bias else None

            def logits(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor = x) -> torch.Tensor:
                return x @ w.T + (b if b is not None else 0)

            reference = logits(source_w[i], source_b[i] if source_b else None)
            summary["domains"][state.name] = {
                "tokens": int(x.shape[0]),
                "agreement_before": _agreement(x, reference, logits(merged_w, merged_b), info, kind, selection),
                "agreement_after": _agreement(x, reference, logits(new_w, new_b), info, kind, selection),
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
        from safetensors.torch import load_file, save_file
        from tqdm.auto import tqdm

        moe = {info.index: info for info in self.layout.moe_layers}
        for index in tqdm(range(self.layout.num_layers), desc="calibrating layers", disable=not progress):
            layer = self.walker.materialize(index)
            info = moe.get(index)
            done = self._layer_file(index)
            if info is not None:
                if done.exists():
                    tensors = load_file(str(done))
                    summary = json.loads(done.with_suffix(".json").read_text())
                else:
                    inputs = []
                    for state in self.domains:
                        _, x = self._run_layer(layer, index, state, info)
                        inputs.append(x)
                    if on_router_inputs is not None:
                        on_router_inputs(index, inputs)
                    tensors, summary = self._solve(info, inputs)
                    save_file(tensors, str(done.with_suffix(".tmp")))
                    done.with_suffix(".json").write_text(json.dumps(summary, indent=1))
                    done.with_suffix(".tmp").rename(done)
                self._install(info, tensors)
                self.solved.update(tensors)
                self.summaries.append(summary)
                logger.info("layer %d: %s", index, json.dumps(summary))
            for state in self.domains:
                state.hidden, _ = self._run_layer(layer, index, state, None)
            self.walker.release(index)

    def write(self, out_dir: Path, overwrite: bool) -> Path:
        """OUT = merged model with every MoE router replaced; every other tensor copied bit-identically."""
        reader = self.walker.reader
        with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
            for name in reader.names():
                writer.add(name, self.solved[name] if name in self.solved else reader.read(name))
            writer.copy_support_files(self.merged)
            report = {
                "merged": self.merged,
                "sources": [d.name for d in self.domains],
                "options": self.options.model_dump(mode="json"),
                "layers": self.summaries,
            }
            writer.write_text(SUMMARY_FILE, json.dumps(report, indent=1))
            writer.write_text(
                "README.md",
                model_card(
                    recipe=json.dumps({"calibrate": self.options.model_dump(mode="json")}, indent=1),
                    sources=[d.name for d in self.domains],
                    base=None,
                    summary=f"Stage-1 model `{self.merged}` with every MoE router re-solved by HARC.",
                ),
            )
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
) -> Path:
    """Write `out_dir` = `merged` with every MoE router re-solved by HARC on the domains' text."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: output exists; pass overwrite to replace it")
    work = Path(work_dir) if work_dir else out_dir.parent / f"{out_dir.name}.work"
    calibrator = Calibrator(merged, domains, options or CalibrationOptions(), work)
    calibrator.run(progress=progress)
    return calibrator.write(out_dir, overwrite)
