"""Every stage-1 method on the shipped specialists, each calibrated with HARC, all diagnosed; writes docs/RESULTS.md.

    python examples/specialists/experiment.py [--family olmoe glm4_moe] [--methods ...] [--work DIR]

Per family (a folder of checkpoints/ built by build.py):

1. stage 1 with every method of `moemerge.merge.registry.method_names()` and `regmean` (parameters in
   METHOD_PARAMETERS);
2. stage 2: HARC (gamma 0.9) on each stage-1 model, with the demo's calibration text; and the same
   calibration with `experts: true` (routing-aware RegMean of the experts, then HARC, in one walk), and on
   VARIANT_METHODS the same with RegMean's `classic` variant, to check the default (`sequential`) here too;
3. diagnose: the stage-1 models with oracle routers (the source's routers swapped in: the ceiling of
   any router calibration), then base, specialists and the calibrated models, all on the same
   held-out text (the demo's split: 32 of each domain's 64 shipped samples, never calibration text);
4. the MoE-block ceiling of each stage-1 model (moe_ceiling.py): the share of its gap to each specialist
   that closes when the specialist's MoE blocks (routers + experts) are swapped in, and the converse; any
   method that rewrites only MoE blocks (HARC, experts + HARC) is measured against it;
5. sweeps on task_arithmetic: HARC gamma and calibration samples per domain.

Every configuration tried goes into RESULTS.md with its numbers; a configuration that failed is listed
with its error. RESULTS.md is generated: never edit it by hand, rerun this script. Raw numbers go to
examples/specialists/results/<family>.json and the plots to examples/specialists/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from demo import CALIBRATION, DOMAINS, recipe  # noqa: E402
from moe_ceiling import mean_share, measure  # noqa: E402

METHOD_PARAMETERS: dict[str, dict] = {
    # per-source parameters (weight 1 each, i.e. task arithmetic with lambda 1; linear normalises the weights)
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15},
    "wudi": {},
    "wudi_exact": {},
    # RegMean of every linear layer on each source's calibration text (the calibrate section's), the rest
    # (embeddings, norms, head, routers) by its default rest rule: linear, i.e. the average
    "regmean": {},
}
# <family>-full: specialists from build.py --mode full; olmoe-wide: the shape with experts ~85 % of the weights
FAMILIES = ("olmoe", "glm4_moe", "olmoe-full", "olmoe-wide", "olmoe-wide-full")
GOAL_CEILING = 0.8  # experts + HARC should reach this share of the MoE-block ceiling
GOAL_ORACLE = 0.8  # HARC alone should recover this share of the oracle-router gain ...
ORACLE_MIN_GAIN = 0.05  # ... wherever that gain is at least this many nats
SWEEP_METHOD = "task_arithmetic"
VARIANT_METHODS = ("task_arithmetic", "linear")
CLASSIC = " + experts (classic) + HARC"
SWEEP_GAMMA = (0.5, 0.9, 1.0, 1.5)
SWEEP_SAMPLES = (8, 16, 32)  # 32 is all a domain has once its 32 held-out samples are set aside


def _options(samples: int = CALIBRATION, gamma: float = 0.9, experts: bool = False, variant: str | None = None):
    """The demo's calibration options; `experts`: RegMean of the experts (default regmean section unless
    `variant` is given) before HARC."""
    from moemerge.calibrate.options import CalibrationOptions

    section = recipe("olmoe", "linear", harc={"gamma": gamma}, samples=samples)["calibrate"]
    section.pop("domains")
    regmean = {"variant": variant} if variant else {}
    return CalibrationOptions.model_validate(dict(section, experts=experts, regmean=regmean))


def _domains(family: str):
    from moemerge.calibrate.runner import Domain

    root = HERE / "checkpoints" / family
    return [Domain(str(root / d), (str(HERE / "data" / f"{d}.jsonl"),)) for d in DOMAINS]


def _timed(fn, *args, **kwargs):
    start = time.time()
    result = fn(*args, **kwargs)
    return result, time.time() - start


def _evaluations(report, names: dict[str, str]) -> dict:
    """{row name: {domain: {loss, agreement, kl}}} of a report's candidate and oracle rows."""
    rows = {}
    for model, role in report.rows():
        rows[names.get(model, model)] = {
            d: {
                "loss": report.get(model, d, role).loss,
                "agreement": report.get(model, d, role).mean_agreement,
                "kl": report.get(model, d, role).mean_kl,
            }
            for d in DOMAINS
        }
    return rows


def _calibrate_experts(
    stage1: str, domains, out: Path, entry: dict, result: dict, progress: bool, variant: str | None = None
) -> str | None:
    """Stage 2 with experts=True (RegMean of the experts, then HARC) on one stage-1 model; None if it failed."""
    from moemerge.calibrate.runner import calibrate

    try:
        path, entry[f"experts_{variant}_seconds" if variant else "experts_seconds"] = _timed(
            calibrate, stage1, domains, out, _options(experts=True, variant=variant), progress=progress
        )
        return str(path)
    except Exception as err:  # every failure is reported, with its error
        result["failures"].append({"configuration": f"{out.parent.name} + experts + HARC", "error": repr(err)})
        traceback.print_exc()
        return None


def run_family(family: str, methods: list[str], work: Path, progress: bool) -> dict:
    from moemerge.calibrate.runner import calibrate
    from moemerge.diagnose.evaluate import diagnose
    from moemerge.diagnose.options import DiagnoseOptions
    from moemerge.diagnose.report import ORACLE_SUFFIX
    from moemerge.pipeline.stage1 import merge_checkpoints

    root = work / family
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    domains = _domains(family)
    options = _options()
    log = json.loads((HERE / "checkpoints" / family / "build_log.json").read_text())
    config = json.loads((HERE / "checkpoints" / family / "base" / "config.json").read_text())
    result: dict = {"family": family, "mode": log["mode"], "methods": {}, "failures": [], "times": {}, "sweep": {}}
    result["shape"] = {
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "experts": config.get("num_experts", config.get("n_routed_experts")),
        "top_k": config["num_experts_per_tok"],
        "expert_width": config.get("moe_intermediate_size", config["intermediate_size"]),
        "esft_experts": len(log["code"]["experts_trained"][0]) if "experts_trained" in log["code"] else None,
        **({"parameters": log["parameters"]} if "parameters" in log else {}),
    }
    stage1, harc, experts = {}, {}, {}
    for method in methods:
        entry: dict = {"parameters": METHOD_PARAMETERS.get(method, {})}
        result["methods"][method] = entry
        try:
            path = root / f"{method}.yaml"
            path.write_text(yaml.safe_dump(recipe(family, method, METHOD_PARAMETERS.get(method))))
            out, entry["merge_seconds"] = _timed(merge_checkpoints, path, root / method / "stage1", progress=progress)
            stage1[method] = str(out)
            out, entry["calibrate_seconds"] = _timed(
                calibrate, str(out), domains, root / method / "harc", options, progress=progress
            )
            harc[method] = str(out)
            summary = json.loads((out / "moemerge_calibration.json").read_text())
            keep = ("layer", "iterations", "relative_residual", "converged", "seconds")
            entry["calibration"] = {"layers": [{k: layer[k] for k in keep} for layer in summary["layers"]]}
        except Exception as err:  # every failure is reported, with its error
            result["failures"].append({"configuration": f"{method} (stage 1 or HARC)", "error": repr(err)})
            traceback.print_exc()
        if method in stage1:
            out = _calibrate_experts(stage1[method], domains, root / method / "experts-harc", entry, result, progress)
            if out:
                experts[method] = out
        print(f"{family} {method}: {entry}" if "calibration" not in entry else f"{family} {method}: done")
    classic = {}  # the other RegMean variant, on two stage-1 methods, to check the default (sequential) here too
    for method in [m for m in VARIANT_METHODS if m in stage1]:
        entry = result["methods"][method]
        out = _calibrate_experts(stage1[method], domains, root / method / "classic", entry, result, progress, "classic")
        if out:
            classic[method] = out

    try:
        result["ceiling"], result["times"]["MoE-block swap (ceiling)"] = _timed(
            measure, stage1, domains, options.data, root / "ceiling", batch_tokens=options.batch_tokens
        )
    except Exception as err:  # every failure is reported, with its error
        result["failures"].append({"configuration": "MoE-block swap (ceiling)", "error": repr(err)})
        traceback.print_exc()

    reference = stage1.get(SWEEP_METHOD, next(iter(stage1.values())))
    diag = DiagnoseOptions(data=options.data, batch_tokens=options.batch_tokens, stage1=reference, oracle_routers=True)
    report, result["times"]["diagnose stage 1 + oracle"] = _timed(
        diagnose, stage1, domains, root / "report-stage1", diag, progress=progress
    )
    names = {m + ORACLE_SUFFIX: f"{m} + oracle routers" for m in stage1}
    result["rows"] = _evaluations(report, names)
    result["sources"] = {d: {"loss": report.source(d).loss} for d in DOMAINS}
    result["heldout_tokens"] = {d.name: d.heldout_tokens for d in report.domains}
    result["calibration_tokens"] = {d.name: d.calibration_tokens for d in report.domains}
    _copy_plots(root / "report-stage1", family, "stage1")

    models = {"base": str(HERE / "checkpoints" / family / "base")}
    models.update({f"specialist {d}": str(HERE / "checkpoints" / family / d) for d in DOMAINS})
    models.update({f"{m} + HARC": p for m, p in harc.items()})
    models.update({f"{m} + experts + HARC": p for m, p in experts.items()})
    models.update({f"{m}{CLASSIC}": p for m, p in classic.items()})
    diag = DiagnoseOptions(data=options.data, batch_tokens=options.batch_tokens, stage1=models["base"])
    report, result["times"]["diagnose base, specialists, HARC, experts + HARC"] = _timed(
        diagnose, models, domains, root / "report-harc", diag, progress=progress
    )
    result["rows"].update(_evaluations(report, {}))
    _copy_plots(root / "report-harc", family, "harc")

    if SWEEP_METHOD in stage1:
        sweep = {}
        for gamma in SWEEP_GAMMA:
            for samples in SWEEP_SAMPLES if gamma == 0.9 else (CALIBRATION,):
                name = f"gamma {gamma}, {samples} samples"
                if gamma == 0.9 and samples == CALIBRATION:
                    sweep[name] = harc.get(SWEEP_METHOD)
                    continue
                try:
                    out, seconds = _timed(
                        calibrate,
                        stage1[SWEEP_METHOD],
                        domains,
                        root / "sweep" / name.replace(", ", "-").replace(" ", ""),
                        _options(samples, gamma),
                        progress=progress,
                    )
                    sweep[name] = str(out)
                    result["sweep"][name] = {"calibrate_seconds": seconds}
                except Exception as err:
                    result["failures"].append({"configuration": f"sweep {name}", "error": repr(err)})
        sweep = {k: v for k, v in sweep.items() if v}
        diag = DiagnoseOptions(data=options.data, batch_tokens=options.batch_tokens)
        report, result["times"]["diagnose sweep"] = _timed(
            diagnose, sweep, domains, root / "report-sweep", diag, progress=progress
        )
        for name, rows in _evaluations(report, {}).items():
            result["sweep"].setdefault(name, {})["rows"] = rows
    return result


def _copy_plots(report_dir: Path, family: str, tag: str) -> None:
    target = HERE / "results" / family
    target.mkdir(parents=True, exist_ok=True)
    for png in sorted(report_dir.glob("*.png")):
        if "agreement" in png.name or "loss" in png.name:
            shutil.copy(png, target / f"{tag}-{png.name}")


# ------------------------------------------------------------------------------------------- report


def _mode(result: dict) -> str:
    """What the family's specialists are: how they were fine-tuned, and its shape where the run recorded it."""
    shape = result.get("shape")
    if result["mode"] == "esft":
        trained = f"{shape['esft_experts']} of {shape['experts']}" if shape else "3 of 8"
        text = (
            f"expert-specialised fine-tunes (`build.py --mode esft`: per domain {trained} experts per layer and the "
            "routers trained, everything else frozen at the base)"
        )
    else:
        text = "full fine-tunes (`build.py --mode full`: every weight trained, attention included)"
    if not shape:
        return text + "."
    text += (
        f". Shape: {shape['layers']} MoE layers, hidden {shape['hidden']}, {shape['experts']} experts of width "
        f"{shape['expert_width']}, top-{shape['top_k']}"
    )
    if "parameters" in shape:
        total, experts = shape["parameters"]["total"], shape["parameters"]["experts"]
        text += f"; {total / 1e6:.2f}M parameters, {experts / total:.0%} of them in the experts"
    return text + "."


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _fractions(result: dict, method: str, stage2: str = " + HARC") -> tuple[float | None, float | None]:
    """Mean over domains of stage 2's (row suffix `stage2`) share of the oracle gain and of the specialist gap."""
    rows = result["rows"]
    if method + stage2 not in rows or method not in rows:
        return None, None
    oracle = []
    for d in DOMAINS:
        l1, lh, lo = (rows[name][d]["loss"] for name in (method, method + stage2, f"{method} + oracle routers"))
        oracle.append((l1 - lh) / (l1 - lo) if abs(l1 - lo) > 1e-6 else float("nan"))
    return _mean(oracle), _gap(result, method, method + stage2)


def _row(name: str, cells: list[str]) -> str:
    return "| " + " | ".join([name, *cells]) + " |"


def family_markdown(result: dict) -> list[str]:
    family, rows = result["family"], result["rows"]
    methods = [m for m in result["methods"] if m in rows]
    header = "| model | " + " | ".join(DOMAINS) + " | mean |\n|---|" + "---:|" * (len(DOMAINS) + 1)
    lines = [f"## {family}", ""]
    lines += [
        f"Specialists: {_mode(result)}",
        "",
        f"Held-out tokens per domain: {result['heldout_tokens']}; calibration tokens per domain: "
        f"{result['calibration_tokens']}.",
        "",
        "### Held-out loss (nats per token; lower is better)",
        "",
        header,
    ]
    order = ["base"] + [f"specialist {d}" for d in DOMAINS]
    for m in methods:
        order += [m, f"{m} + HARC", f"{m} + experts + HARC", f"{m}{CLASSIC}", f"{m} + oracle routers"]
    for name in order:
        if name in rows:
            losses = [rows[name][d]["loss"] for d in DOMAINS]
            lines.append(_row(name, [f"{v:.4f}" for v in losses] + [f"{_mean(losses):.4f}"]))
    own = [result["sources"][d]["loss"] for d in DOMAINS]
    lines.append(_row("each specialist on its own domain", [f"{v:.4f}" for v in own] + [f"{_mean(own):.4f}"]))
    lines += [
        "",
        "### Top-1 routing agreement with the domain's specialist (held-out tokens, mean over MoE layers)",
        "",
        header,
    ]
    for name in order:
        if name in rows and not name.startswith("specialist"):
            values = [rows[name][d]["agreement"] for d in DOMAINS]
            lines.append(_row(name, [f"{v:.3f}" for v in values] + [f"{_mean(values):.3f}"]))
    lines += [
        "",
        "### What HARC recovers, and what each stage costs",
        "",
        "oracle gain recovered = (L_stage1 - L_HARC) / (L_stage1 - L_oracle); specialist gap recovered = "
        "(L_stage1 - L_HARC) / (L_stage1 - L_specialist); both per domain, then averaged. The `+ experts + HARC` "
        "columns: the same with the model calibrated with experts=True in place of HARC alone.",
        "",
        "| method | mean loss stage 1 | + HARC | oracle | oracle gain recovered | specialist gap recovered "
        "| + experts + HARC | specialist gap recovered (+ experts) | merge s | HARC s | experts + HARC s "
        "| CG iterations (max) |",
        "|---|" + "---:|" * 11,
    ]
    for m in methods:
        entry = result["methods"][m]
        oracle, gap = _fractions(result, m)
        gap_experts = _fractions(result, m, " + experts + HARC")[1]
        mean = {
            k: _mean(rows[k][d]["loss"] for d in DOMAINS)
            for k in (m, f"{m} + HARC", f"{m} + experts + HARC", f"{m} + oracle routers")
            if k in rows
        }
        layers = entry.get("calibration", {}).get("layers", [])
        iterations = (
            max((layer.get("iterations", 0) for layer in layers), default=0) if isinstance(layers, list) else "?"
        )
        lines.append(
            _row(
                m,
                [
                    f"{mean.get(m, float('nan')):.4f}",
                    f"{mean.get(m + ' + HARC', float('nan')):.4f}",
                    f"{mean.get(m + ' + oracle routers', float('nan')):.4f}",
                    "n/a" if oracle is None else f"{oracle:.3f}",
                    "n/a" if gap is None else f"{gap:.3f}",
                    f"{mean.get(m + ' + experts + HARC', float('nan')):.4f}",
                    "n/a" if gap_experts is None else f"{gap_experts:.3f}",
                    f"{entry.get('merge_seconds', float('nan')):.1f}",
                    f"{entry.get('calibrate_seconds', float('nan')):.1f}",
                    f"{entry.get('experts_seconds', float('nan')):.1f}",
                    str(iterations),
                ],
            )
        )
    lines += ["", "Diagnose time: " + "; ".join(f"{k} {v:.0f} s" for k, v in result["times"].items()), ""]
    lines += ceiling_markdown(result)
    if result["sweep"]:
        lines += [
            f"### Sweep on {SWEEP_METHOD}: HARC gamma and calibration samples per domain",
            "",
            "| configuration | "
            + " | ".join(f"{d} loss" for d in DOMAINS)
            + " | mean loss | mean agreement | HARC s |",
            "|---|" + "---:|" * (len(DOMAINS) + 3),
        ]
        for name, entry in result["sweep"].items():
            if "rows" not in entry:
                continue
            r = entry["rows"]
            losses = [r[d]["loss"] for d in DOMAINS]
            agreement = _mean(r[d]["agreement"] for d in DOMAINS)
            seconds = entry.get("calibrate_seconds")
            lines.append(
                _row(
                    name,
                    [f"{v:.4f}" for v in losses]
                    + [f"{_mean(losses):.4f}", f"{agreement:.3f}", "main run" if seconds is None else f"{seconds:.1f}"],
                )
            )
        lines.append("")
    lines += ["### Failures", ""]
    lines += [f"- {f['configuration']}: `{f['error']}`" for f in result["failures"]] or ["- none"]
    lines += ["", "### Plots", ""]
    for png in sorted((HERE / "results" / family).glob("*.png")):
        lines.append(f"![{family} {png.stem}](../{png.relative_to(REPO)})")
    return lines + [""]


def _ceiling_stats(result: dict, method: str) -> dict | None:
    """One stage-1 method against its MoE-block ceiling; None where the family's run did not measure it.

    Means over domains: `ceiling` and `converse` (moe_ceiling.py), the oracle-router gain in nats, the shares of
    the stage-1-to-specialist gap HARC and experts + HARC close, and those shares over the mean ceiling. `harc_oracle`:
    HARC's share of the oracle gain on each domain where that gain is at least ORACLE_MIN_GAIN nats (the goal's
    domains).
    """
    measured, rows = result.get("ceiling", {}).get(method), result["rows"]
    if not measured or method not in rows:
        return None
    stats = {key: mean_share(measured, key) for key in ("ceiling", "converse")}
    oracle = f"{method} + oracle routers"
    gains = {d: rows[method][d]["loss"] - rows[oracle][d]["loss"] for d in DOMAINS} if oracle in rows else {}
    stats["oracle_gain"] = _mean(gains.values()) if gains else float("nan")
    stats["harc_oracle"] = {}
    for stage2, key in ((" + HARC", "harc"), (" + experts + HARC", "experts")):
        if method + stage2 in rows:
            stats[key] = _gap(result, method, method + stage2)
            stats[f"{key}_of_ceiling"] = stats[key] / stats["ceiling"] if abs(stats["ceiling"]) > 1e-9 else float("nan")
    if method + " + HARC" in rows:
        for d, gain in gains.items():
            if gain >= ORACLE_MIN_GAIN:
                stats["harc_oracle"][d] = (rows[method][d]["loss"] - rows[method + " + HARC"][d]["loss"]) / gain
    return stats


def _goal_verdict(stats: dict) -> str:
    """Whether the issue's two goals hold for one method (experts + HARC vs the ceiling; HARC vs the oracle)."""
    parts = []
    ratio = stats.get("experts_of_ceiling")
    if ratio is not None:
        parts.append(
            f"experts + HARC {'meets' if ratio >= GOAL_CEILING else 'misses'} {GOAL_CEILING:.1f} of the ceiling"
        )
    qualifying = stats["harc_oracle"]
    if not qualifying:
        parts.append(f"no domain has an oracle gain >= {ORACLE_MIN_GAIN} nats")
    else:
        low = min(qualifying.values())
        parts.append(
            f"HARC {'meets' if low >= GOAL_ORACLE else 'misses'} {GOAL_ORACLE:.0%} of the oracle gain on "
            f"{len(qualifying)} domain(s) with gain >= {ORACLE_MIN_GAIN} (lowest {low:.2f})"
        )
    return "; ".join(parts)


def ceiling_markdown(result: dict) -> list[str]:
    """The MoE-block ceiling section: per method, what any MoE-only method could close and what stage 2 closes."""
    lines = ["### MoE-block ceiling: how much of each gap a method that rewrites only MoE blocks could close", ""]
    if "ceiling" not in result:
        return lines + ["Not measured in this family's run (rerun experiment.py to add it).", ""]
    lines += [
        "ceiling = (L_stage1 - L_{stage1 with the specialist's MoE blocks}) / (L_stage1 - L_specialist): the "
        "specialist's routers and experts (every MoE block) swapped into the stage-1 model; converse = "
        "(L_{specialist with the stage-1 MoE blocks} - L_specialist) / (L_stage1 - L_specialist); both per domain on "
        "its held-out text, then averaged (examples/specialists/moe_ceiling.py). Oracle gain: L_stage1 - "
        "L_{stage1 + oracle routers}, nats. `HARC / ceiling` and `experts + HARC / ceiling`: their share of the "
        f"stage-1-to-specialist gap over the mean ceiling (goal for experts + HARC: >= {GOAL_CEILING}). HARC's share "
        f"of the oracle gain is the lowest over the domains where that gain is >= {ORACLE_MIN_GAIN} nats "
        f"(goal: >= {GOAL_ORACLE}). The ceiling bounds router calibration only loosely and experts + HARC not at "
        "all: the specialist's blocks are tuned to the specialist's attention and embeddings, while RegMean re-solves "
        "the experts on the stage-1 model's own inputs, so a ratio above 1 is possible.",
        "",
        "| method | ceiling | converse | oracle gain (nats) | HARC: share of oracle gain (domains) "
        "| HARC: gap share | HARC / ceiling | experts + HARC: gap share | experts + HARC / ceiling |",
        "|---|" + "---:|" * 8,
    ]
    for m in result["methods"]:
        stats = _ceiling_stats(result, m)
        if stats is None:
            continue
        qualifying = stats["harc_oracle"]
        oracle = f"{min(qualifying.values()):.3f} ({len(qualifying)})" if qualifying else "gain < 0.05 (0)"
        cells = [f"{stats['ceiling']:.3f}", f"{stats['converse']:.3f}", f"{stats['oracle_gain']:.4f}", oracle]
        for key in ("harc", "harc_of_ceiling", "experts", "experts_of_ceiling"):
            cells.append(f"{stats[key]:.3f}" if key in stats else "n/a")
        lines.append(_row(m, cells))
    lines += ["", "Per domain (held-out loss, nats per token):", ""]
    lines += [
        "| method | domain | stage 1 | specialist | stage 1 with the specialist's MoE blocks "
        "| specialist with the stage-1 MoE blocks | ceiling | converse |",
        "|---|---|" + "---:|" * 6,
    ]
    for m in [m for m in ("linear", SWEEP_METHOD) if m in result["ceiling"]]:
        for d, v in result["ceiling"][m].items():
            losses = [v["merged"], v["specialist"], v["merged_with_specialist_moe"], v["specialist_with_merged_moe"]]
            lines.append(_row(m, [d, *(f"{x:.4f}" for x in losses), f"{v['ceiling']:.3f}", f"{v['converse']:.3f}"]))
    return lines + [""] + parts_markdown(result)


def parts_markdown(result: dict) -> list[str]:
    """Where else the gap lies: the ceiling with another part swapped in instead (results/<family>-parts.json)."""
    record = result.get("parts")
    if not record:
        return []
    others = [p for p in record["parts"] if p != "moe"]
    lines = [
        "### Where the rest of the gap lies: one part of the specialist swapped in at a time",
        "",
        f"`{record['command']}`: the share of the stage-1-to-specialist gap closed when one part of the specialist "
        "(its MoE blocks, every layer's self-attention, the input embeddings or the output head; PARTS in "
        "moe_ceiling.py) is swapped into the stage-1 model; mean over domains (per domain in results/"
        f"{result['family']}-parts.json). The parts interact, so the shares need not add up to 1.",
        "",
        "| method | " + " | ".join(["MoE blocks", *others]) + " |",
        "|---|" + "---:|" * (1 + len(others)),
    ]
    for method, measured in record["result"].items():
        cells = [mean_share(measured, "ceiling")] + [mean_share(measured, "ceiling", p) for p in others]
        lines.append(_row(method, [f"{v:.3f}" for v in cells]))
    return lines + [""]


def _ceiling_line(result: dict) -> str:
    """The headline's sentence on the MoE-block ceiling of the average and of the sweep method, and the goals."""
    parts = []
    for m in dict.fromkeys(("linear", SWEEP_METHOD)):
        stats = _ceiling_stats(result, m)
        if stats is None:
            continue
        parts.append(
            f"{m}: MoE-block ceiling {stats['ceiling']:.2f} of the gap (converse {stats['converse']:.2f}); oracle gain "
            f"{stats['oracle_gain']:.3f} nats; experts + HARC closes {stats.get('experts', float('nan')):.2f} of the "
            f"gap = {stats.get('experts_of_ceiling', float('nan')):.2f} of the ceiling, HARC alone "
            f"{stats.get('harc_of_ceiling', float('nan')):.2f} of it; {_goal_verdict(stats)}"
        )
    if not parts:
        return "MoE-block ceiling: not measured in this run."
    text = "Against the MoE-block ceiling (specialist's routers + experts swapped in): " + ". ".join(parts) + "."
    record = result.get("parts", {}).get("result", {})
    if "linear" in record:
        others = [p for p in result["parts"]["parts"] if p != "moe"]
        shares = ", ".join(f"{p} {mean_share(record['linear'], 'ceiling', p):.2f}" for p in others)
        text += f" Other parts of the specialist swapped into linear instead of the MoE blocks close: {shares}."
    return text


def headline(result: dict) -> str:
    """One paragraph per family: the sweep method's breakdown and repair, and the best merge against the base."""
    rows, m = result["rows"], SWEEP_METHOD

    def mean(name: str, key: str = "loss") -> float:
        return _mean(rows[name][d][key] for d in DOMAINS)

    def spread(name: str) -> str:
        values = [rows[name][d]["agreement"] for d in DOMAINS]
        return f"{min(values):.2f}-{max(values):.2f}"

    oracle, gap = _fractions(result, m)
    own = _mean(result["sources"][d]["loss"] for d in DOMAINS)
    merged = {k: mean(k) for k in rows if k in result["methods"] or k.endswith(" + HARC")}
    best = min(merged, key=merged.get)
    base = mean("base")
    verdict = (
        f"no merged model beats the base ({base:.3f}) on mean held-out loss"
        if merged[best] >= base
        else f"below the base ({base:.3f}) on mean held-out loss"
    )
    return (
        f"- **{result['family']}** ({result['mode']}), {m} (lambda 1): mean held-out loss {mean(m):.3f} against base "
        f"{base:.3f} and specialists on their own domains {own:.3f}; top-1 agreement with the "
        f"specialists {spread(m)}. Oracle routers reach {mean(m + ' + oracle routers'):.3f}; HARC reaches "
        f"{mean(m + ' + HARC'):.3f} with agreement {spread(m + ' + HARC')}, i.e. {oracle:.2f} of the oracle gain "
        f"and {gap:.2f} of the stage-1-to-specialist gap (the rest lies in the merged experts). "
        f"{_ceiling_line(result)} {_experts_line(result)} {_variant_line(result)} {_regmean_line(result)} "
        f"Best merged model: {best} ({merged[best]:.3f}); {verdict}."
    )


def _experts_line(result: dict) -> str:
    """The headline's sentence on the sweep method calibrated with experts=True (RegMean of the experts, then HARC)."""
    m, rows = SWEEP_METHOD, result["rows"]
    name = f"{m} + experts + HARC"
    if name not in rows:
        return f"{name}: not run or failed (see Failures)."
    oracle, gap = _fractions(result, m, " + experts + HARC")
    loss = _mean(rows[name][d]["loss"] for d in DOMAINS)
    agreement = [rows[name][d]["agreement"] for d in DOMAINS]
    seconds = result["methods"][m].get("experts_seconds", float("nan"))
    return (
        f"With the experts re-solved too ({name}, {seconds:.0f} s against HARC's "
        f"{result['methods'][m].get('calibrate_seconds', float('nan')):.0f} s): {loss:.3f}, agreement "
        f"{min(agreement):.2f}-{max(agreement):.2f}, {gap:.2f} of the stage-1-to-specialist gap "
        f"(goal: 0.90) and {oracle:.2f} of the gain of stage 1 with oracle routers. {_experts_spread(result)}"
    )


def _experts_spread(result: dict) -> str:
    """How far apart the stage-1 methods end up once calibrated with experts=True (mean held-out loss)."""
    rows = result["rows"]
    names = [f"{m} + experts + HARC" for m in result["methods"] if f"{m} + experts + HARC" in rows]
    losses = [_mean(rows[name][d]["loss"] for d in DOMAINS) for name in names]
    text = f"Over the {len(losses)} stage-1 methods, + experts + HARC spans {min(losses):.4f}-{max(losses):.4f}"
    if result["mode"] == "esft":
        text += (
            " (one model whatever stage 1 did: these specialists differ from the base only in experts and routers, "
            "so every method leaves the other weights at the base; RegMean re-solves each expert from the sources' "
            "own activations, which stage 1 does not enter unless an expert falls back; and HARC's least-squares "
            "solution does not depend on its start point)"
        )
    return text + "."


def _variant_line(result: dict) -> str:
    """The headline's sentence on the default RegMean variant (sequential) against classic."""
    rows, parts = result["rows"], []
    for m in VARIANT_METHODS:
        if f"{m} + experts + HARC" in rows and f"{m}{CLASSIC}" in rows:
            sequential, classic = (
                _mean(rows[n][d]["loss"] for d in DOMAINS) for n in (f"{m} + experts + HARC", m + CLASSIC)
            )
            parts.append(f"{m} {sequential:.4f} against {classic:.4f}")
    if not parts:
        return "RegMean variants: not compared (failed; see Failures)."
    return (
        "RegMean's default variant (sequential) against classic, mean loss + experts + HARC: " + "; ".join(parts) + "."
    )


def _regmean_line(result: dict) -> str:
    """The headline's sentence on `regmean` (every linear layer) against experts-only RegMean on the average."""
    rows = result["rows"]
    names = ["linear", "linear + experts + HARC", "regmean", "regmean + HARC", "regmean + experts + HARC"]
    if any(n not in rows for n in names):
        return "regmean: not run or failed (see Failures)."
    loss = {n: _mean(rows[n][d]["loss"] for d in DOMAINS) for n in names}
    gap = {n: _gap(result, "linear", n) for n in names[1:]}
    return (
        "Against the average (`linear`, "
        f"{loss['linear']:.3f}), the share of its gap to the specialists closed: experts only (linear + experts + "
        f"HARC) {gap['linear + experts + HARC']:.2f} ({loss['linear + experts + HARC']:.3f}); every linear layer, "
        f"stage-1 `regmean` {gap['regmean']:.2f} ({loss['regmean']:.3f}), + HARC {gap['regmean + HARC']:.2f} "
        f"({loss['regmean + HARC']:.3f}), + experts + HARC {gap['regmean + experts + HARC']:.2f} "
        f"({loss['regmean + experts + HARC']:.3f})."
    )


def _gap(result: dict, start: str, end: str) -> float:
    """Mean over domains of (L_start - L_end) / (L_start - L_specialist): the share of the gap `end` closes."""
    rows, gaps = result["rows"], []
    for d in DOMAINS:
        l1, l2, ls = rows[start][d]["loss"], rows[end][d]["loss"], result["sources"][d]["loss"]
        gaps.append((l1 - l2) / (l1 - ls) if abs(l1 - ls) > 1e-6 else float("nan"))
    return _mean(gaps)


def write_results() -> Path:
    """docs/RESULTS.md from every results/<family>.json present (each written by its own run)."""
    results = [
        json.loads((HERE / "results" / f"{family}.json").read_text())
        for family in FAMILIES
        if (HERE / "results" / f"{family}.json").is_file()
    ]
    for result in results:  # moe_ceiling.py --json results/<family>-parts.json, where it was run
        parts = HERE / "results" / f"{result['family']}-parts.json"
        if parts.is_file():
            result["parts"] = json.loads(parts.read_text())
    lines = [
        "# Results: merging real specialists, routing breakdown and its repair",
        "",
        "<!-- generated by examples/specialists/experiment.py; do not edit by hand -->",
        "",
        "Runs: "
        + "; ".join(f"`{r['command']}` ({r['seconds'] / 60:.1f} min, {r['family']})" for r in results)
        + ", on a shared 2-core CPU. Specialists, data and split: examples/specialists/DATA.md. Held-out text: "
        "32 samples per domain (seed 0), never calibration text; HARC calibration: "
        f"{CALIBRATION} of the remaining samples per domain, gamma 0.9, kronecker preconditioner; `+ experts + "
        "HARC`: the same calibration with experts=True (routing-aware RegMean of the experts with the default "
        "regmean options, docs/EXPERTS.md, then HARC, in one walk); `+ experts (classic) + HARC`: the same with "
        "RegMean's classic variant. Oracle "
        "routers: the stage-1 model with the domain's specialist's routers swapped in, the best any router "
        "calibration can reach. MoE-block ceiling: the stage-1 model with the domain's specialist's MoE blocks "
        "(routers and experts) swapped in, the best any method that rewrites only MoE blocks can reach "
        "(examples/specialists/moe_ceiling.py). Method parameters: "
        + "; ".join(f"{m} {p or 'defaults'}" for m, p in METHOD_PARAMETERS.items())
        + " (weight 1.0 per source).",
        "",
    ]
    lines += ["## Headline", ""] + [headline(r) for r in results] + [""]
    lines += [
        "Not run: calibration sets above 32 samples per domain (the shipped evaluation pool holds 64 samples "
        "per domain, 32 of them held out), other method parameters (one setting per method, listed above), "
        "and GLM-4-MoE specialists built with `--mode full` (full fine-tunes: OLMoE only, `olmoe-full` and "
        "`olmoe-wide-full`). "
        + (
            "Families whose run predates the MoE-block ceiling (no ceiling table): "
            + ", ".join(r["family"] for r in results if "ceiling" not in r)
            + "."
            if any("ceiling" not in r for r in results)
            else ""
        ),
        "",
    ]
    for result in results:
        lines += family_markdown(result)
    path = REPO / "docs" / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    from moemerge.merge.registry import method_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES))
    parser.add_argument("--report-only", action="store_true", help="Only rewrite RESULTS.md from results/*.json.")
    parser.add_argument("--methods", nargs="+", default=[*method_names(), "regmean"])
    parser.add_argument("--work", type=Path, default=Path("out/specialists-experiment"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: run one family per core)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    command = "python examples/specialists/experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for family in [] if args.report_only else args.family:
        if not (HERE / "checkpoints" / family).is_dir():
            print(f"{family}: no checkpoints, skipped")
            continue
        start = time.time()
        result = run_family(family, args.methods, args.work, not args.quiet)
        result.update(command=command.strip(), seconds=time.time() - start)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"{family}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {write_results()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
