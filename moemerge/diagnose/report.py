"""The diagnostics report: what was measured, as JSON, as markdown tables, and written atomically with its plots.

A `Report` holds one `Evaluation` per (model, domain): a candidate on every domain, each candidate
with the domain's source routers swapped in (`oracle` rows, when asked for), and every source on its
own domain (the reference). `headline_table` is the part meant for a model card.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moemerge import __version__
from moemerge.diagnose.metrics import LayerRouting

REPORT_JSON = "report.json"
REPORT_MD = "report.md"

Role = Literal["candidate", "oracle", "source"]
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


@dataclass
class Report:
    """Everything `diagnose` measured; `to_dict` is report.json."""

    router_kind: str
    kl: str
    stage1: str
    candidates: dict[str, str]
    domains: list[DomainInfo]
    evaluations: list[Evaluation]
    options: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

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
            },
            "stage1": self.stage1,
            "candidates": self.candidates,
            "domains": [vars(d) for d in self.domains],
            "options": self.options,
            "warnings": self.warnings,
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


def headline_table(report: Report) -> str:
    """Markdown: per domain, each model's held-out loss (and its difference to the source) and mean agreement.

    Ready to paste into a model card; the `run` command puts it there.
    """
    header = ["model"]
    for d in report.domains:
        header += [f"{d.name} loss", f"{d.name} agreement"]
    header.append("gap recovered (mean)")
    rows = [
        ["source (reference)"] + [c for d in report.domains for c in (f"{report.source(d.name).loss:.4f}", "1.000")]
    ]
    rows[0].append("1.000")
    for model, role in report.rows():
        row = [model]
        recovered = []
        for d in report.domains:
            e = report.get(model, d.name, role)
            delta = e.loss - report.source(d.name).loss
            row += [f"{e.loss:.4f} ({delta:+.4f})", f"{e.mean_agreement:.3f}"]
            recovered.append(report.recovered(e))
        known = [r for r in recovered if r is not None]
        row.append(_fraction(sum(known) / len(known) if known else None))
        rows.append(row)
    return _table(header, rows)


def headline_note(report: Report) -> str:
    """One paragraph explaining the headline table's columns."""
    return (
        "Loss: mean next-token cross-entropy (nats) on each domain's held-out text, in brackets the "
        "difference to that domain's source model. Agreement: mean over MoE layers of the fraction of the "
        "source's top-k experts the model also picks, on the same held-out tokens, each model running its own "
        f"forward pass. Gap recovered: {RECOVERED_METHOD}, with stage 1 = `{report.stage1}`, averaged over "
        "domains."
    )


def markdown(report: Report, plots: list[str] = ()) -> str:
    """report.md: the headline first, then setup, loss, per-layer routing, and the plots."""
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
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(report: Report, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write report.json, report.md and the PNG plots to `out_dir` atomically (temporary folder, then rename)."""
    from moemerge.diagnose.plots import write_plots

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: report folder exists; pass overwrite to replace it")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        plots = write_plots(report, tmp)
        (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        (tmp / REPORT_MD).write_text(markdown(report, plots))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
