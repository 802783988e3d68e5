"""PNG plots of a diagnostics report (matplotlib's Agg canvas, no pyplot, imported inside functions).

- `agreement_per_layer.png`: a panel per domain; top-k agreement with the source per MoE layer, a line
  per candidate (oracle-router rows dashed, in their candidate's colour).
- `expert_load_<candidate>.png`: heat maps (MoE layers x experts) of the fraction of assignments each
  expert receives, a column per domain; rows: the candidate, the candidate with that domain's source
  routers (when oracle rows were evaluated), and the source itself, all on the domain's held-out text.
- `loss_per_domain.png`: grouped bars of held-out loss, a group per domain: its source, then each
  candidate (oracle rows hatched).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from moemerge.diagnose.report import ORACLE_SUFFIX

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moemerge.diagnose.report import Evaluation, Report

AGREEMENT_PNG = "agreement_per_layer.png"
LOSS_PNG = "loss_per_domain.png"


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout=layout)


def _colours(report: Report) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(report.candidates)}


def plot_agreement(report: Report, path: Path) -> None:
    """A panel per domain: top-k agreement with the source per MoE layer, a line per candidate / oracle row."""
    colours = _colours(report)
    n = len(report.domains)
    fig = _figure(4.2 * n + 1.5, 3.6)
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    for ax, domain in zip(axes, report.domains, strict=True):
        for model, role in report.rows():
            e = report.get(model, domain.name, role)
            base = model.removesuffix(ORACLE_SUFFIX) if role == "oracle" else model
            ax.plot(
                [layer.layer for layer in e.layers],
                [layer.agreement for layer in e.layers],
                marker="o",
                linestyle="--" if role == "oracle" else "-",
                color=colours.get(base),
                label=model,
            )
        ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":")
        ax.set_title(f"domain: {domain.name}")
        ax.set_xlabel("MoE layer")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("top-k agreement with source")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    fig.savefig(path)


def plot_expert_load(report: Report, model: str, path: Path) -> None:
    """Heat maps (MoE layers x experts) of expert load: a column per domain, rows model / + oracle / source.

    The rows put the candidate's load next to what its routers would give with the source's routers
    (when oracle rows were evaluated) and next to the source's own load on the same text.
    """
    import numpy as np

    oracle = f"{model}{ORACLE_SUFFIX}"
    has_oracle = (oracle, "oracle") in report.rows()
    grid: list[list[tuple[str, Evaluation]]] = []
    grid.append([(f"{model} on {d.name}", report.get(model, d.name)) for d in report.domains])
    if has_oracle:
        grid.append([(f"+ oracle routers of {d.name}", report.get(oracle, d.name, "oracle")) for d in report.domains])
    grid.append([(f"{d.name} (source)", report.source(d.name)) for d in report.domains])
    loads = [[np.array([layer.load for layer in e.layers]) for _, e in row] for row in grid]
    top = max(float(load.max()) for row in loads for load in row) or 1.0
    num_layers, num_experts = loads[0][0].shape
    annotate = num_layers * num_experts <= 256
    panel_width = min(max(2.5, 0.55 * num_experts if annotate else 0.12 * num_experts), 9.0)
    panel_height = 0.6 + (0.3 if annotate else 0.15) * num_layers
    # margins in inches, laid out by hand: a layout engine costs seconds per figure of many panels
    width, height = panel_width * len(report.domains) + 1.9, panel_height * len(grid) + 1.0
    fig = _figure(width, height, layout=None)
    left, right, bottom, top_margin = 0.7 / width, 1 - 1.2 / width, 0.5 / height, 1 - 0.55 / height
    fig.subplots_adjust(
        left=left, right=right, bottom=bottom, top=top_margin, wspace=0.35 / panel_width, hspace=0.4 / panel_height
    )
    axes = fig.subplots(len(grid), len(report.domains), squeeze=False, sharex=True, sharey=True)
    image = None
    for r, row in enumerate(grid):
        for c, (title, e) in enumerate(row):
            ax, load = axes[r][c], loads[r][c]
            image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_title(title, fontsize="small")
            ax.set_yticks(range(num_layers), [str(layer.layer) for layer in e.layers])
            ax.xaxis.get_major_locator().set_params(integer=True)
            if annotate:
                for (y, x), value in np.ndenumerate(load):
                    colour = "black" if value > 0.6 * top else "white"
                    ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize="x-small", color=colour)
        axes[r][0].set_ylabel("MoE layer")
    for ax in axes[-1]:
        ax.set_xlabel("expert")
    colour_bar = fig.add_axes((1 - 0.95 / width, bottom, 0.15 / width, top_margin - bottom))
    fig.colorbar(image, cax=colour_bar, label="fraction of assignments")
    fig.suptitle(f"expert load: {model}; uniform = {1 / num_experts:.3f}")
    fig.savefig(path)


def plot_loss(report: Report, path: Path) -> None:
    """Grouped bars: per domain, the source's held-out loss and each candidate's / oracle row's."""
    import numpy as np

    colours = _colours(report)
    rows = report.rows()
    n_bars = len(rows) + 1
    width = 0.8 / n_bars
    fig = _figure(max(5.0, 1.2 + 0.45 * n_bars * len(report.domains)) + 2.0, 3.8)
    ax = fig.subplots()
    x = np.arange(len(report.domains))
    sources = [report.source(d.name).loss for d in report.domains]
    bars = ax.bar(x - 0.4 + width / 2, sources, width, color="0.45", label="source (reference)")
    ax.bar_label(bars, fmt="%.3f", fontsize="x-small", rotation=90, padding=2)
    for i, (model, role) in enumerate(rows, start=1):
        base = model.removesuffix(ORACLE_SUFFIX) if role == "oracle" else model
        losses = [report.get(model, d.name, role).loss for d in report.domains]
        bars = ax.bar(
            x - 0.4 + width * (i + 0.5),
            losses,
            width,
            color=colours.get(base),
            hatch="//" if role == "oracle" else None,
            edgecolor="white" if role == "oracle" else None,
            label=model,
        )
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", rotation=90, padding=2)
    # losses differ by little relative to their size: zoom in (the axis says it does not start at 0)
    everything = sources + [report.get(m, d.name, r).loss for m, r in rows for d in report.domains]
    low, high = min(everything), max(everything)
    spread = max(high - low, 0.01 * abs(high), 1e-3)
    ax.set_ylim(max(0.0, low - 0.5 * spread), high + 0.35 * spread)
    ax.set_xticks(x, [d.name for d in report.domains])
    ax.set_ylabel("held-out loss (nats / token)" + ("" if low - 0.5 * spread <= 0 else ", axis not from 0"))
    ax.set_title("next-token loss on each domain's held-out text")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right center", fontsize="small")
    fig.savefig(path)


def safe_name(name: str) -> str:
    """A file-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def write_plots(report: Report, out_dir: Path) -> list[str]:
    """Write every plot of `report` into `out_dir`; return their file names."""
    written = []
    plot_agreement(report, out_dir / AGREEMENT_PNG)
    written.append(AGREEMENT_PNG)
    plot_loss(report, out_dir / LOSS_PNG)
    written.append(LOSS_PNG)
    for model, role in report.rows():
        if role != "candidate":
            continue  # oracle rows are drawn in their candidate's heat map
        name = f"expert_load_{safe_name(model)}.png"
        if name in written:
            raise ValueError(f"two models map to the plot file {name}; rename one of the model folders")
        plot_expert_load(report, model, out_dir / name)
        written.append(name)
    return written
