"""The diagnostics report: what was measured, as JSON and as markdown tables (written by diagnose/output.py).

A `Report` holds one `Evaluation` per (model, domain): a candidate on every domain, each candidate
with the domain's source routers swapped in (`oracle` rows, when asked for), and every source on its
own domain (the reference), plus a `Calibration` per candidate that `moemerge calibrate` wrote (what
its summary file says about each MoE layer's router solve and expert merge). `headline_table` is the
part meant for a model card.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from moemerge import __version__
from moemerge.diagnose.metrics import LayerRouting

REPORT_JSON = "report.json"
REPORT_MD = "report.md"

Role = Literal["candidate", "oracle", "source"]
SOURCE_ROW: tuple[str, Role] = ("source", "source")
"""The row of the sources themselves (each on its own domain) in `headline_table`."""
ORACLE_SUFFIX = " + oracle routers"
"""Appended to a candidate's name for its rows with the domain's source routers swapped in."""

ROUTING_METHOD = (
    "Routing statistics of a model on a domain come from that model's own forward pass (its own earlier "
    "layers) over the domain's held-out text, compared token by token with the domain's source model's own "
    "forward pass over the same tokens. The source's router logits for the held-out tokens are stored during "
    "its pass (CPU, float32) and reused for every candidate, not recomputed. Padding tokens are excluded. "
    "Each model picks its top-k experts with its own selection bias, if its family has one; group-limited "
    "selection (DeepSeek n_group/topk_group) is not modelled: the unrestricted top-k is counted."
)
LOSS_METHOD = (
    "Mean next-token cross-entropy in nats per predicted token on the domain's held-out text (logits at "
    "position t predict token t+1, padding excluded, as transformers computes it with labels), over all "
    "held-out tokens of the domain; perplexity = exp(loss)."
)
HELDOUT_METHOD = (
    "Held-out text: the DataOptions.heldout samples of each domain (one seeded shuffle, see moemerge.data), "
    "disjoint from the calibration samples of the same options; tokenised with the source model's tokenizer."
)
RECOVERED_METHOD = "recovered = (loss_stage1 - loss_model) / (loss_stage1 - loss_source), per domain"
CALIBRATION_METHOD = (
    "From each calibrated candidate's moemerge_calibration.json, as `moemerge calibrate` wrote it, per MoE layer. "
    "HARC: CG iterations of the router solve; converged: its relative residual reached the tolerance. Experts "
    "(routing-aware RegMean): an expert is calibrated when some source routes at least min_tokens calibration "
    "tokens to it, else it keeps its stage-1 weights; fallbacks: projections (gate/up, down) of calibrated experts "
    "whose Gram was rank deficient, solved with a ridge towards stage 1. Tokens: calibration tokens each source's "
    "own router routes to each expert, in that source's own forward pass over its own domain's calibration text "
    "(top-k membership: a token counts once for each of its k experts, so a source's total is k × its calibration "
    "tokens); min / median / max over the layer's experts. Linear layers merged with linear_layers: all are in the "
    "file only."
)


@dataclass(frozen=True)
class DomainInfo:
    """One source model, its domain's text and how much of it was calibration and held-out text."""

    name: str
    source: str
    files: list[str]
    calibration_samples: int
    calibration_tokens: int
    heldout_samples: int
    heldout_tokens: int


@dataclass(frozen=True)
class Evaluation:
    """One model on one domain's held-out text: loss and per-MoE-layer routing versus the source."""

    model: str
    role: Role
    path: str
    domain: str
    loss: float
    predicted_tokens: int
    layers: list[LayerRouting]

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def mean_agreement(self) -> float:
        return sum(layer.agreement for layer in self.layers) / len(self.layers)

    @property
    def mean_exact_match(self) -> float:
        return sum(layer.exact_match for layer in self.layers) / len(self.layers)

    @property
    def mean_kl(self) -> float:
        return sum(layer.kl for layer in self.layers) / len(self.layers)


@dataclass(frozen=True)
class HarcSolve:
    """The HARC router solve of one MoE layer, as the calibration summary records it."""

    iterations: int
    converged: bool


@dataclass(frozen=True)
class TokenCounts:
    """Calibration tokens one source routes to each expert of a layer, summarised over the experts."""

    total: int
    min: int
    median: float
    max: int
    zero: int  # experts the source routes no token to


@dataclass(frozen=True)
class ExpertsCalibration:
    """Routing-aware RegMean of one MoE layer's experts: what was re-solved and from how much data."""

    calibrated: int
    kept_stage1: int
    fallbacks: int
    min_tokens: int
    tokens: dict[str, TokenCounts]  # source model folder, as the calibration run named it -> counts


@dataclass(frozen=True)
class LayerCalibration:
    """One MoE layer of a calibrated model; either part is None where that run did not solve it."""

    layer: int
    harc: HarcSolve | None
    experts: ExpertsCalibration | None


@dataclass(frozen=True)
class Calibration:
    """A candidate's calibration summary (`moemerge calibrate`'s SUMMARY_FILE), one record per MoE layer."""

    file: str
    layers: list[LayerCalibration]

    @property
    def has_harc(self) -> bool:
        return any(layer.harc is not None for layer in self.layers)

    @property
    def has_experts(self) -> bool:
        return any(layer.experts is not None for layer in self.layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        layers = []
        for layer in data["layers"]:
            harc = HarcSolve(**layer["harc"]) if layer["harc"] is not None else None
            experts = layer["experts"]
            if experts is not None:
                tokens = {source: TokenCounts(**counts) for source, counts in experts["tokens"].items()}
                experts = ExpertsCalibration(**{**experts, "tokens": tokens})
            layers.append(LayerCalibration(layer["layer"], harc, experts))
        return cls(data["file"], layers)

    @classmethod
    def from_summary(cls, summary: Any, file: str) -> Calibration:
        """Parse a calibration summary: `layers` (HARC, per MoE layer) and `regmean.layers` (experts).

        Raises ValueError naming the field that is missing or of the wrong type, so that a report
        never shows numbers taken from a file it only half understood.
        """
        harc: dict[int, HarcSolve] = {}
        for i, layer in enumerate(_field(summary, "layers", list, "")):
            where = f"layers[{i}]"
            index = _field(layer, "layer", int, where)
            harc[index] = HarcSolve(_field(layer, "iterations", int, where), _field(layer, "converged", bool, where))
        experts: dict[int, ExpertsCalibration] = {}
        if isinstance(summary, dict) and "regmean" in summary:
            for key, layer in _field(summary["regmean"], "layers", dict, "regmean").items():
                where = f"regmean.layers.{key}"
                if not isinstance(layer, dict):
                    raise ValueError(f"{where}: expected an object, got {layer!r}")
                if "experts" not in layer:
                    continue  # a dense layer (linear_layers: all)
                if not key.isdigit():
                    raise ValueError(f"{where}: expected a layer index as key")
                record, where = layer["experts"], f"{where}.experts"
                tokens = {}
                for source, counts in _field(record, "tokens", dict, where).items():
                    at = f"{where}.tokens[{source!r}]"
                    values = {name: _field(counts, name, int, at) for name in ("total", "min", "max", "zero")}
                    tokens[source] = TokenCounts(median=float(_field(counts, "median", (int, float), at)), **values)
                experts[int(key)] = ExpertsCalibration(
                    *(_field(record, name, int, where) for name in ("calibrated", "kept_stage1", "fallbacks")),
                    min_tokens=_field(record, "min_tokens", int, where),
                    tokens=tokens,
                )
        layers = [LayerCalibration(i, harc.get(i), experts.get(i)) for i in sorted(harc.keys() | experts.keys())]
        return cls(file, layers)


def _field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[key], checked to be of `kind` (a bool is not a number here); ValueError naming the field."""
    name = f"{where}.{key}" if where else key
    if not isinstance(record, dict):
        raise ValueError(f"{where or 'top level'}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{name}: missing")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


@dataclass
class Report:
    """Everything `diagnose` measured; `to_dict` is report.json.

    `calibrations`: candidate name -> its calibration summary, for candidates `moemerge calibrate` wrote.
    """

    router_kind: str
    kl: str
    stage1: str
    candidates: dict[str, str]
    domains: list[DomainInfo]
    evaluations: list[Evaluation]
    options: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibrations: dict[str, Calibration] = field(default_factory=dict)

    def get(self, model: str, domain: str, role: Role = "candidate") -> Evaluation:
        for evaluation in self.evaluations:
            if (evaluation.model, evaluation.domain, evaluation.role) == (model, domain, role):
                return evaluation
        raise KeyError(f"no {role} evaluation of {model!r} on domain {domain!r}")

    def source(self, domain: str) -> Evaluation:
        return self.get(domain, domain, "source")

    def rows(self) -> list[tuple[str, Role]]:
        """(model, role) of every candidate and oracle row, in evaluation order (sources excluded)."""
        seen: list[tuple[str, Role]] = []
        for e in self.evaluations:
            if e.role != "source" and (e.model, e.role) not in seen:
                seen.append((e.model, e.role))
        return seen

    def recovered(self, evaluation: Evaluation) -> float | None:
        """Fraction of the stage-1-to-source loss gap this evaluation closes (None if the gap is ~0)."""
        stage1 = self.get(self.stage1, evaluation.domain).loss
        gap = stage1 - self.source(evaluation.domain).loss
        if abs(gap) <= 1e-9 * max(1.0, abs(stage1)):
            return None
        return (stage1 - evaluation.loss) / gap + 0.0  # + 0.0: no "-0.000" for stage 1 itself

    def to_dict(self) -> dict:
        return {
            "moemerge_version": __version__,
            "method": {
                "routing": ROUTING_METHOD,
                "router_kind": self.router_kind,
                "kl": self.kl,
                "agreement": "mean over tokens of the fraction of the source's top-k experts the model also picks",
                "exact_match": "fraction of tokens whose top-k expert set equals the source's",
                "load": "fraction of all top-k assignments each expert receives; load_entropy in nats",
                "loss": LOSS_METHOD,
                "recovered": RECOVERED_METHOD,
                "heldout": HELDOUT_METHOD,
                "calibration": CALIBRATION_METHOD,
            },
            "stage1": self.stage1,
            "candidates": self.candidates,
            "domains": [vars(d) for d in self.domains],
            "options": self.options,
            "warnings": self.warnings,
            "calibrations": {name: c.to_dict() for name, c in self.calibrations.items()},
            "evaluations": [
                {
                    "model": e.model,
                    "role": e.role,
                    "path": e.path,
                    "domain": e.domain,
                    "loss": e.loss,
                    "perplexity": e.perplexity if math.isfinite(e.perplexity) else None,
                    "predicted_tokens": e.predicted_tokens,
                    "recovered": self.recovered(e),
                    "mean_agreement": e.mean_agreement,
                    "mean_exact_match": e.mean_exact_match,
                    "mean_kl": e.mean_kl,
                    "layers": [layer.to_dict() for layer in e.layers],
                }
                for e in self.evaluations
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        evaluations = [
            Evaluation(
                e["model"],
                e["role"],
                e["path"],
                e["domain"],
                e["loss"],
                e["predicted_tokens"],
                [LayerRouting.from_dict(layer) for layer in e["layers"]],
            )
            for e in data["evaluations"]
        ]
        return cls(
            router_kind=data["method"]["router_kind"],
            kl=data["method"]["kl"],
            stage1=data["stage1"],
            candidates=data["candidates"],
            domains=[DomainInfo(**d) for d in data["domains"]],
            evaluations=evaluations,
            options=data.get("options", {}),
            warnings=data.get("warnings", []),
            calibrations={name: Calibration.from_dict(c) for name, c in data.get("calibrations", {}).items()},
        )


def load_report(report_dir: str | Path) -> Report:
    """Read a report folder's report.json back."""
    path = Path(report_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no diagnostics report there")
    return Report.from_dict(json.loads(path.read_text()))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def headline_table(report: Report, rows: Sequence[tuple[str, Role]] | None = None) -> str:
    """Markdown: per domain, each model's held-out loss (and its difference to the source) and mean agreement.

    Ready to paste into a model card; the `run` command puts it there. `rows`: which (model, role)
    rows in which order, `("source", "source")` standing for the sources themselves; by default the
    sources first, then every candidate and oracle row in evaluation order.
    """
    header = ["model"]
    for d in report.domains:
        header += [f"{d.name} loss", f"{d.name} agreement"]
    header.append("gap recovered (mean)")
    table = []
    for model, role in rows if rows is not None else [SOURCE_ROW, *report.rows()]:
        if role == "source":
            cells = [c for d in report.domains for c in (f"{report.source(d.name).loss:.4f}", "1.000")]
            table.append(["source (reference)", *cells, "1.000"])
            continue
        row = [model]
        recovered = []
        for d in report.domains:
            e = report.get(model, d.name, role)
            delta = e.loss - report.source(d.name).loss
            row += [f"{e.loss:.4f} ({delta:+.4f})", f"{e.mean_agreement:.3f}"]
            recovered.append(report.recovered(e))
        known = [r for r in recovered if r is not None]
        row.append(_fraction(sum(known) / len(known) if known else None))
        table.append(row)
    return _table(header, table)


def headline_note(report: Report) -> str:
    """One paragraph explaining the headline table's columns."""
    return (
        "Loss: mean next-token cross-entropy (nats) on each domain's held-out text, in brackets the "
        "difference to that domain's source model. Agreement: mean over MoE layers of the fraction of the "
        "source's top-k experts the model also picks, on the same held-out tokens, each model running its own "
        f"forward pass. Gap recovered: {RECOVERED_METHOD}, with stage 1 = `{report.stage1}`, averaged over "
        "domains."
    )


def _count(value: float) -> str:
    """A token count; the median over an even number of experts can end in .5."""
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def _source_label(report: Report, source: str) -> str:
    """A calibration source by the report's name for its domain (same folder), else by its folder as recorded."""
    for domain in report.domains:
        if source == domain.source or Path(source).resolve() == Path(domain.source).resolve():
            return domain.name
    return f"`{source}`"


def calibration_table(report: Report, calibration: Calibration) -> str:
    """Markdown: one row per MoE layer; expert columns if its experts were calibrated, HARC columns if its routers."""
    sources = list(dict.fromkeys(s for layer in calibration.layers if layer.experts for s in layer.experts.tokens))
    header = ["layer"]
    if calibration.has_experts:
        header += ["experts calibrated", "kept stage 1", "fallbacks"]
        for label in (_source_label(report, source) for source in sources):
            header += [f"{label} tokens", f"{label} tokens per expert (min / median / max)"]
    if calibration.has_harc:
        header += ["HARC iterations", "converged"]
    rows = []
    for layer in calibration.layers:
        row = [str(layer.layer)]
        experts = layer.experts
        if experts is not None:
            row += [str(experts.calibrated), str(experts.kept_stage1), str(experts.fallbacks)]
            for source in sources:
                t = experts.tokens.get(source)
                row += ["—", "—"] if t is None else [str(t.total), f"{t.min} / {_count(t.median)} / {t.max}"]
        elif calibration.has_experts:
            row += ["—"] * (3 + 2 * len(sources))
        if layer.harc is not None:
            row += [str(layer.harc.iterations), "yes" if layer.harc.converged else "**no**"]
        elif calibration.has_harc:
            row += ["—", "—"]
        rows.append(row)
    return _table(header, rows)


def calibration_section(report: Report) -> list[str]:
    """report.md lines: a table per calibrated candidate (none if no candidate has a calibration summary)."""
    if not report.calibrations:
        return []
    lines = ["## Calibration", "", CALIBRATION_METHOD, ""]
    for model, calibration in report.calibrations.items():
        lines += [f"### Calibration of {model}", ""]
        min_tokens = sorted({layer.experts.min_tokens for layer in calibration.layers if layer.experts})
        note = f"From `{calibration.file}`"
        if min_tokens:
            note += f"; min_tokens {', '.join(map(str, min_tokens))}"
        if not calibration.layers:
            lines += [f"{note}: no MoE layer recorded.", ""]
            continue
        lines += [f"{note}.", "", calibration_table(report, calibration), ""]
    return lines


def markdown(report: Report, plots: list[str] = ()) -> str:
    """report.md: the headline first, then setup, loss, per-layer routing, calibration records, and the plots."""
    lines = ["# Routing diagnostics", "", "## Headline", "", headline_table(report), "", headline_note(report), ""]
    lines += [f"**Warning:** {warning}" + "\n" for warning in report.warnings]
    lines += ["## Setup", "", f"- {ROUTING_METHOD}", f"- Router kind: `{report.router_kind}`; KL: {report.kl}."]
    lines += [f"- {LOSS_METHOD}", f"- Stage 1 (for gap recovered): `{report.stage1}`."]
    if any(role == "oracle" for _, role in report.rows()):
        lines.append(
            "- `<model> + oracle routers`: the model with every MoE router (weight, bias, selection bias) replaced "
            "by the domain's source router: the best any router calibration could do."
        )
    lines += [f"- {HELDOUT_METHOD}", ""]
    lines.append(
        _table(
            ["domain", "source", "calibration samples", "calibration tokens", "held-out samples", "held-out tokens"],
            [
                [
                    d.name,
                    f"`{d.source}`",
                    str(d.calibration_samples),
                    str(d.calibration_tokens),
                    str(d.heldout_samples),
                    str(d.heldout_tokens),
                ]
                for d in report.domains
            ],
        )
    )
    lines += ["", "Models:", ""]
    lines += [f"- {name}: `{path}`" for name, path in report.candidates.items()]
    lines += ["", "## Held-out loss", ""]
    loss_rows = []
    for d in report.domains:
        source = report.source(d.name)
        loss_rows.append(
            [d.name, "source (reference)", f"{source.loss:.4f}", f"{source.perplexity:.3f}", "+0.0000", "1.000"]
        )
        for model, role in report.rows():
            e = report.get(model, d.name, role)
            delta = f"{e.loss - source.loss:+.4f}"
            loss_rows.append(
                [d.name, model, f"{e.loss:.4f}", f"{e.perplexity:.3f}", delta, _fraction(report.recovered(e))]
            )
    lines += [_table(["domain", "model", "loss", "perplexity", "Δ vs source", "gap recovered"], loss_rows), ""]
    for d in report.domains:
        lines += [f"## Routing per layer: {d.name}", ""]
        rows = []
        evaluations = [report.source(d.name)] + [report.get(m, d.name, r) for m, r in report.rows()]
        for e in evaluations:
            label = "source (reference)" if e.role == "source" else e.model
            for layer in e.layers:
                rows.append(
                    [
                        str(layer.layer),
                        label,
                        f"{layer.agreement:.3f}",
                        f"{layer.exact_match:.3f}",
                        f"{layer.kl:.4f}",
                        f"{layer.load_entropy:.3f} / {math.log(len(layer.load)):.3f}",
                    ]
                )
        header = ["layer", "model", "agreement", "exact match", "KL", "load entropy / max"]
        lines += [_table(header, rows), ""]
    lines += ["Per-expert loads are in report.json and in the expert-load heat maps.", ""]
    lines += calibration_section(report)
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)
