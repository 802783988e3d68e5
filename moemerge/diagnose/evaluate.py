"""Evaluate candidate models against each source on that source's domain's held-out text.

Every model is run with the `LayerWalker`, one decoder layer in memory at a time, over the
held-out batches of the domains it is evaluated on (a *stream* per model x domain, plus a stream per
domain with the source's routers swapped in for `oracle_routers`). Order of work:

1. each source on its own domain: its router logits for every real held-out token of every MoE
   layer are stored on the CPU in float32 (L x N x E x 4 bytes for each domain, all domains kept
   until the end, N = the domain's held-out tokens; held-out sets are small, so storing beats a
   source pass per candidate);
2. each candidate, in one pass over its layers for all domains (each layer is read from disk once):
   at each MoE layer the router input of each real token is caught by a forward pre-hook on the
   router module, turned into logits with the router's own weight and bias, and compared with the
   stored source logits of the same tokens; after the last layer the final norm and output head
   give the next-token loss.

Memory: the hidden states of every stream's held-out sequences (tokens x d, padding included, in
the forward dtype), one layer's weights, the stored source logits, and one chunk of output logits.

Routing statistics thus come from each model's *own* forward pass (its own earlier layers), not
from the source's activations: what the model really does on the text.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.architectures.layout import ModelLayout, MoeLayer, load_layout
from moemerge.calibrate.runner import SUMMARY_FILE, Domain
from moemerge.calibrate.walk import LayerWalker
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.data import Batch, DataOptions, TokenizedDomain, batches, load_domain
from moemerge.diagnose.metrics import RoutingTally, kl_description
from moemerge.diagnose.options import DiagnoseOptions
from moemerge.diagnose.output import write_report
from moemerge.diagnose.report import (
    ORACLE_SUFFIX,
    Calibration,
    DomainInfo,
    Evaluation,
    Report,
    Role,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_LOSS_CHUNK = 2048
"""Tokens per chunk of output logits when computing the loss (bounds the tokens x vocab matrix)."""


@dataclass
class HeldOut:
    """One domain's held-out text, batched, and the source's stored router logits on it."""

    info: DomainInfo
    batches: list[Batch]
    reference: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # MoE layer -> per-batch logits
    selection_bias: dict[int, torch.Tensor | None] = field(default_factory=dict)


@dataclass
class _Stream:
    """One model on one domain: hidden states in flight, routing tallies, and the loss sums."""

    model: str
    role: Role
    domain: HeldOut
    routers: CheckpointReader | None  # swap in these routers (oracle); None keeps the model's own
    record: bool  # store this pass's logits as the domain's reference (the source pass)
    hidden: list[torch.Tensor] = field(default_factory=list)
    tallies: dict[int, RoutingTally] = field(default_factory=dict)
    nll: float = 0.0
    predicted: int = 0


def _display_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for model folders: the folder name, with parents added until unique."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth > max(len(p) for p in parts):
            return names
        depth += 1


def _check_compatible(reference: ModelLayout, other: ModelLayout, path: str, reference_path: str) -> None:
    def shape(layout: ModelLayout) -> list[tuple]:
        return [
            (m.index, m.router_weight, m.router_bias, m.selection_bias, m.num_experts, m.top_k)
            for m in layout.moe_layers
        ]

    if other.family != reference.family or shape(other) != shape(reference) or other.num_layers != reference.num_layers:
        raise ValueError(
            f"{path}: its MoE layout ({other.family.model_type}, {other.num_layers} layers, "
            f"{len(other.moe_layers)} MoE layers) differs from {reference_path}'s "
            f"({reference.family.model_type}, {reference.num_layers} layers, {len(reference.moe_layers)} MoE layers)"
        )
    if other.config.vocab_size != reference.config.vocab_size:
        raise ValueError(
            f"{path}: vocabulary of {other.config.vocab_size} tokens, "
            f"{reference_path} has {reference.config.vocab_size}"
        )


def _tokenize(domain: Domain, options: DiagnoseOptions) -> tuple[TokenizedDomain, TokenizedDomain, int]:
    """(calibration, held-out, padding id) of a domain, tokenised with its source model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(domain.source, trust_remote_code=False)
    calibration, heldout = load_domain(domain.source, domain.files, tokenizer, options.data)
    if heldout is None:
        raise ValueError(_NO_HELDOUT)
    return calibration, heldout, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _load_heldout(name: str, domain: Domain, options: DiagnoseOptions) -> HeldOut:
    calibration, heldout, pad_id = _tokenize(domain, options)
    info = DomainInfo(
        name=name,
        source=str(domain.source),
        files=[str(f) for f in domain.files],
        calibration_samples=len(calibration),
        calibration_tokens=calibration.num_tokens,
        heldout_samples=len(heldout),
        heldout_tokens=heldout.num_tokens,
    )
    return HeldOut(info, list(batches(heldout, options.batch_tokens, pad_id)))


def heldout_text(domain: Domain, options: DiagnoseOptions) -> TokenizedDomain:
    """The held-out samples `diagnose` evaluates a domain on (tokenised with the source's tokenizer)."""
    return _tokenize(domain, options)[1]


_NO_HELDOUT = (
    "diagnose evaluates on held-out text, and DataOptions.heldout is 0: set --heldout (a count or a fraction of "
    "each domain's samples), with the same --seed the calibration used, so the held-out samples were never "
    "calibration text"
)


def _calibration_split(model_dir: str) -> dict | None:
    """The `calibrate.data` options recorded in a model's card (README.md recipe block), if any."""
    import yaml

    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return None
    for block in re.findall(r"```yaml\n(.*?)```", card.read_text(errors="replace"), flags=re.S):
        try:
            recipe = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        section = recipe.get("calibrate") if isinstance(recipe, dict) else None
        data = section.get("data") if isinstance(section, dict) else None
        if isinstance(data, dict):
            return data
    return None


def _split_warnings(candidates: Mapping[str, str], data: DataOptions) -> list[str]:
    """Warn where a candidate was calibrated with another held-out split than the one evaluated here."""
    warnings = []
    for name, path in candidates.items():
        if not (Path(path) / SUMMARY_FILE).is_file():
            continue  # not a calibrated model: no calibration text to overlap with
        recorded = _calibration_split(path)
        if recorded is None:
            continue
        theirs = (recorded.get("heldout", 0), recorded.get("seed", 0))
        if theirs != (data.heldout, data.seed):
            warnings.append(
                f"{name} was calibrated with heldout={theirs[0]}, seed={theirs[1]} (its model card) but this report "
                f"evaluates heldout={data.heldout}, seed={data.seed}: its held-out text may include calibration text"
            )
    return warnings


def _read_calibration(model_dir: str) -> Calibration | None:
    """What `moemerge calibrate` recorded in a model folder; None for a model it did not write (no summary file)."""
    path = Path(model_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return Calibration.from_summary(json.loads(path.read_text()), str(path))
    except ValueError as err:  # also json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not a readable moemerge calibration summary: {err}") from err


def _router_tensors(model: torch.nn.Module, info: MoeLayer) -> dict[str, torch.Tensor]:
    """The in-memory router tensors of one MoE layer, keyed by on-disk name (weight, bias, selection bias)."""
    pairs = [
        (info.router_weight, info.router_weight_in_memory),
        (info.router_bias, info.router_bias_in_memory),
        (info.selection_bias, info.selection_bias_in_memory),
    ]
    tensors = {}
    for disk, memory in pairs:
        if disk is None or memory is None:
            continue
        owner, _, attr = memory.rpartition(".")
        tensors[disk] = getattr(model.get_submodule(owner), attr)
    return tensors


def _install(targets: dict[str, torch.Tensor], values: Mapping[str, torch.Tensor], where: str) -> None:
    import torch

    with torch.no_grad():
        for name, target in targets.items():
            value = values[name]
            if value.shape != target.shape:
                raise ValueError(
                    f"{where}: router tensor {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(value.to(target.device, target.dtype))


def _router_logits(model: torch.nn.Module, info: MoeLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 router logits of inputs `x` (computed in x's dtype) with the router as installed; the selection bias."""
    import torch.nn.functional as F

    weight = model.get_parameter(info.router_weight_in_memory)
    bias = model.get_parameter(info.router_bias_in_memory) if info.router_bias_in_memory else None
    selection = None
    if info.selection_bias_in_memory:
        owner, _, attr = info.selection_bias_in_memory.rpartition(".")
        selection = getattr(model.get_submodule(owner), attr).detach().float().cpu()
    logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return logits.float().cpu(), selection


def _run_streams(
    path: str, layout: ModelLayout, streams: list[_Stream], options: DiagnoseOptions, progress: bool
) -> None:
    """One pass over `path`'s layers: each layer is materialised once and runs every stream's batches.

    Streams of the same domain share each batch's layer arguments (computed once per batch and
    layer); before a stream runs a batch through a MoE layer, that stream's routers are installed.
    """
    import torch
    from tqdm.auto import tqdm

    dtype = getattr(torch, options.forward_dtype)
    walker = LayerWalker(path, layout, dtype=dtype, device=options.device)
    by_domain: dict[int, list[_Stream]] = {}
    for stream in streams:
        by_domain.setdefault(id(stream.domain), []).append(stream)
    for group in by_domain.values():
        first = [walker.layer_inputs(b.input_ids, b.attention_mask)[0][0] for b in group[0].domain.batches]
        for stream in group:
            stream.hidden = list(first)
    moe = {info.index: info for info in layout.moe_layers}
    label = ", ".join(sorted({s.model for s in streams if s.role != "oracle"}))
    for index in tqdm(range(layout.num_layers), desc=f"diagnose {label}", disable=not progress):
        layer = walker.materialize(index)
        info = moe.get(index)
        routers: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
        live: dict[str, torch.Tensor] = {}
        if info is not None:
            live = _router_tensors(walker.model, info)
            own = (path, {name: tensor.detach().clone() for name, tensor in live.items()})
            for stream in streams:
                if stream.routers is None:
                    routers[id(stream)] = own
                else:
                    routers[id(stream)] = (str(stream.routers.model_dir), {n: stream.routers.read(n) for n in live})
        for group in by_domain.values():
            _run_layer(walker, layer, index, info, group, routers, live, layout)
        walker.release(index)
    for stream in streams:
        _add_loss(walker, stream)
        stream.hidden = []


def _run_layer(
    walker: LayerWalker,
    layer: torch.nn.Module,
    index: int,
    info: MoeLayer | None,
    streams: list[_Stream],
    routers: dict[int, tuple[str, dict[str, torch.Tensor]]],
    live: dict[str, torch.Tensor],
    layout: ModelLayout,
) -> None:
    """Run one domain's batches through one layer for each of its streams; tally routing at MoE layers."""
    import torch

    domain = streams[0].domain
    captured: list[torch.Tensor] = []
    handle = None
    if info is not None:

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            captured.append(x.reshape(-1, x.shape[-1]))

        handle = walker.model.get_submodule(info.router_module).register_forward_pre_hook(hook, with_kwargs=True)
        for stream in streams:
            stream.tallies.setdefault(index, RoutingTally(index, info.num_experts, info.top_k, layout.router_kind))
            if stream.record:
                domain.reference[index] = []
    installed = None
    try:
        with torch.no_grad():
            for b, batch in enumerate(domain.batches):
                kwargs = walker.layer_inputs(batch.input_ids, batch.attention_mask)[index][1]
                for stream in streams:
                    captured.clear()
                    if info is not None and installed is not routers[id(stream)]:
                        installed = routers[id(stream)]
                        _install(live, installed[1], installed[0])
                    stream.hidden[b] = layer(stream.hidden[b], **kwargs)
                    if info is None:
                        continue
                    if len(captured) != 1:
                        raise ValueError(f"layer {index}: router {info.router_module} ran {len(captured)} times")
                    real = batch.attention_mask.reshape(-1).bool().to(captured[0].device)
                    logits, selection = _router_logits(walker.model, info, captured[0][real])
                    if stream.record:
                        domain.reference[index].append(logits)
                        domain.selection_bias[index] = selection
                    reference, reference_bias = domain.reference[index][b], domain.selection_bias[index]
                    stream.tallies[index].update(reference, logits, reference_bias, selection)
    finally:
        if handle is not None:
            handle.remove()


def _add_loss(walker: LayerWalker, stream: _Stream) -> None:
    """Next-token cross-entropy sums of the stream's final hidden states (labels shifted, padding excluded)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        for batch, hidden in zip(stream.domain.batches, stream.hidden, strict=True):
            # as transformers: logits at t predict token t+1; label t+1 is ignored where it is padding
            valid = batch.attention_mask[:, 1:].bool()
            states = hidden[:, :-1][valid.to(hidden.device)]
            labels = batch.input_ids[:, 1:][valid].to(hidden.device)
            for start in range(0, labels.shape[0], _LOSS_CHUNK):
                logits = walker.final_logits(states[start : start + _LOSS_CHUNK]).float()
                loss = F.cross_entropy(logits, labels[start : start + _LOSS_CHUNK], reduction="sum")
                stream.nll += float(loss.double())
            stream.predicted += int(labels.shape[0])


def _evaluation(stream: _Stream, path: str) -> Evaluation:
    if stream.predicted == 0:
        raise ValueError(f"domain {stream.domain.info.name!r}: the held-out text has no token to predict")
    layers = [stream.tallies[i].result() for i in sorted(stream.tallies)]
    return Evaluation(
        model=stream.model,
        role=stream.role,
        path=path,
        domain=stream.domain.info.name,
        loss=stream.nll / stream.predicted,
        predicted_tokens=stream.predicted,
        layers=layers,
    )


def _candidate_name(named: Mapping[str, str], given: str, option: str) -> str:
    """The report name of a candidate given by name or by its path as given (`option` names the setting)."""
    if given in named:
        return given
    by_path = {str(Path(v).resolve()): k for k, v in named.items()}
    if str(Path(given).resolve()) not in by_path:
        raise ValueError(f"{option} {given!r} is not one of the candidate models: {', '.join(named)}")
    return by_path[str(Path(given).resolve())]


def evaluate(
    candidates: Sequence[str | Path] | Mapping[str, str | Path],
    domains: Sequence[Domain],
    options: DiagnoseOptions | None = None,
    *,
    progress: bool = True,
) -> Report:
    """Measure every candidate (and every source, as the reference) on each domain's held-out text.

    `candidates`: model folders (named by folder name) or a mapping name -> folder. The first is
    stage 1 unless `options.stage1` names another (by name or by the path as given). A candidate that
    `moemerge calibrate` wrote gets its calibration summary in `Report.calibrations` (read first: a
    malformed summary stops the run before any model is evaluated).
    """
    options = options or DiagnoseOptions()
    if not options.data.heldout:
        raise ValueError(_NO_HELDOUT)
    if not candidates:
        raise ValueError("diagnose needs at least one candidate model")
    if not domains:
        raise ValueError("diagnose needs at least one source model with its domain's text")
    if isinstance(candidates, Mapping):
        named = {str(k): str(v) for k, v in candidates.items()}
    else:
        paths = [str(c) for c in candidates]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a candidate model is given twice: {sorted(p for p in paths if paths.count(p) > 1)[0]}")
        named = dict(zip(_display_names(paths), paths, strict=True))
    stage1 = _candidate_name(named, options.stage1 or next(iter(named)), "stage1")
    oracle_for = named if options.oracle_for is None else options.oracle_for
    with_oracle = {_candidate_name(named, candidate, "oracle_for") for candidate in oracle_for}

    warnings = _split_warnings(named, options.data)
    for warning in warnings:
        logger.warning(warning)
    calibrations = {name: _read_calibration(path) for name, path in named.items()}  # before any model runs
    sources = [str(d.source) for d in domains]
    if len(set(sources)) != len(sources):
        raise ValueError("a source model is given twice; give each source once with all its domain's files")
    reference = load_layout(sources[0])
    layouts = {}
    for path in [*sources, *named.values()]:
        layouts[path] = load_layout(path)
        _check_compatible(reference, layouts[path], path, sources[0])

    heldout = [
        _load_heldout(name, domain, options) for name, domain in zip(_display_names(sources), domains, strict=True)
    ]
    evaluations: list[Evaluation] = []
    for source, domain in zip(sources, heldout, strict=True):
        stream = _Stream(domain.info.name, "source", domain, routers=None, record=True)
        _run_streams(source, layouts[source], [stream], options, progress)
        evaluations.append(_evaluation(stream, source))
        logger.info("source %s: held-out loss %.4f", source, evaluations[-1].loss)
    for name, path in named.items():
        streams = [_Stream(name, "candidate", d, routers=None, record=False) for d in heldout]
        if options.oracle_routers and name in with_oracle:
            streams += [
                _Stream(f"{name}{ORACLE_SUFFIX}", "oracle", d, routers=CheckpointReader(d.info.source), record=False)
                for d in heldout
            ]
        _run_streams(path, layouts[path], streams, options, progress)
        for stream in streams:
            evaluations.append(_evaluation(stream, path))
    return Report(
        router_kind=reference.router_kind.value,
        kl=kl_description(reference.router_kind),
        stage1=stage1,
        candidates=named,
        domains=[d.info for d in heldout],
        evaluations=evaluations,
        options=options.model_dump(mode="json"),
        warnings=warnings,
        calibrations={name: c for name, c in calibrations.items() if c is not None},
    )


def diagnose(
    candidates: Sequence[str | Path] | Mapping[str, str | Path],
    domains: Sequence[Domain],
    out_dir: str | Path,
    options: DiagnoseOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Report:
    """Evaluate the candidates against the sources (`evaluate`) and write the report folder `out_dir`.

    `out_dir` gets report.json, report.md and the PNG plots, written atomically; an existing folder
    is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: report folder exists; pass overwrite to replace it")
    report = evaluate(candidates, domains, options, progress=progress)
    write_report(report, out_dir, overwrite=overwrite)
    return report
