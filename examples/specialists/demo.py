"""The main job on the shipped specialists: every step of a merge, and what each one repairs, in one table.

    python examples/specialists/demo.py [--family olmoe] [--method task_arithmetic] [-o out/specialists-demo]

Loads the base and the three specialists in `checkpoints/<family>/` (built by build.py, nothing is
trained here) and runs what `moemerge run` runs, one step at a time so that each step is a row:

1. stage 1: the specialists merged tensor by tensor with one dense method (`OUT.stage1`);
2. + HARC: every router re-solved on each domain's calibration text (`OUT.harc`);
3. + experts + HARC: each layer's experts re-merged by routing-aware RegMean, then its router
   (`OUT`, the demo's model; docs/EXPERTS.md).

One `diagnose` call then measures, on each domain's held-out text: the base, the three steps, the
stage-1 merge with each specialist's routers swapped in (the ceiling of any router calibration, the
same for step 2, which changes only routers), and the specialists themselves. The table printed is
`headline_table` of that report (OUT/report/report.json, report.md, plots): the same numbers.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DOMAINS = ("code", "prose", "math")

# Each domain's 64 shipped evaluation samples (data/<domain>.jsonl) split by moemerge with this seed:
# HELDOUT for diagnose, the first CALIBRATION of the rest for HARC; the two never overlap.
HELDOUT = 32
CALIBRATION = 32
MAX_LENGTH = 256

BASE, STAGE1, HARC, EXPERTS = "base", "stage 1", "+ HARC", "+ experts + HARC"


def recipe(
    family: str, method: str, parameters: dict | None = None, harc: dict | None = None, samples: int = CALIBRATION
) -> dict:
    """The `moemerge run` recipe of one stage-1 method on the shipped specialists of `family` (HARC only)."""
    root = HERE / "checkpoints" / family
    sources = [str(root / d) for d in DOMAINS]
    weights = {} if method.startswith("wudi") else {"weight": 1.0}  # WUDI has no per-source parameters
    return {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [{"model": s, "parameters": dict(weights, **(parameters or {}))} for s in sources],
        "dtype": "float32",
        "calibrate": {
            "domains": {s: [str(HERE / "data" / f"{d}.jsonl")] for s, d in zip(sources, DOMAINS, strict=True)},
            "data": {"heldout": HELDOUT, "max_samples": samples, "max_length": MAX_LENGTH, "seed": 0},
            "harc": {"gamma": 0.9, **(harc or {})},
            "batch_tokens": 4096,
        },
    }


def story_rows(method: str) -> list[tuple[str, str]]:
    """The table's rows in the order of the story: before, each step, the routing ceiling, the specialists."""
    from moemerge.diagnose.report import ORACLE_SUFFIX, SOURCE_ROW

    stage1 = f"{STAGE1} ({method})"
    return [
        (BASE, "candidate"),
        (stage1, "candidate"),
        (HARC, "candidate"),
        (EXPERTS, "candidate"),
        (stage1 + ORACLE_SUFFIX, "oracle"),
        SOURCE_ROW,
    ]


def repairs(report, method: str) -> list[str]:
    """One line per step: what it repaired, in the report's numbers (means over domains)."""
    from moemerge.diagnose.report import ORACLE_SUFFIX

    names = [d.name for d in report.domains]
    stage1 = f"{STAGE1} ({method})"

    def mean(model: str, role: str = "candidate", what: str = "recovered") -> float:
        values = []
        for domain in names:
            e = report.get(model, domain, role)
            values.append(e.mean_agreement if what == "agreement" else report.recovered(e))
        return sum(values) / len(values)

    def loss_gap(model: str) -> float:
        return sum(report.get(model, d).loss - report.source(d).loss for d in names) / len(names)

    oracle = mean(stage1 + ORACLE_SUFFIX, "oracle")
    harc, experts = mean(HARC), mean(EXPERTS)
    beats_base = sum(report.get(EXPERTS, d).loss < report.get(BASE, d).loss for d in names)
    routing_share = (
        f"so HARC gets {harc / oracle:.0%} of what routing alone can repair"
        if oracle > 0
        else "so routing alone cannot close this gap"
    )
    return [
        f"stage 1 ({method}): routing breaks: the merged routers pick {mean(stage1, what='agreement'):.0%} of "
        f"each specialist's experts and the loss is {loss_gap(stage1):+.3f} nats from the specialists "
        f"(base: {loss_gap(BASE):+.3f}).",
        f"+ HARC repairs the routing: agreement {mean(HARC, what='agreement'):.0%}, {harc:.2f} of the stage-1 gap "
        f"closed; the specialists' own routers (the ceiling of any router fix) close {oracle:.2f}, {routing_share}.",
        f"+ experts + HARC repairs what routing cannot (experts merged for the tokens each specialist sends them): "
        f"{experts:.2f} of the gap closed, {loss_gap(EXPERTS):+.3f} nats from the specialists, better than the "
        f"base on {beats_base} of {len(names)} domains.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="olmoe", help="Folder under checkpoints/ (olmoe, glm4_moe, ...).")
    parser.add_argument("--method", default="task_arithmetic", help="Stage-1 method (moemerge's registry).")
    parser.add_argument("-o", "--out", type=Path, default=Path("out/specialists-demo"))
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: more threads cost more)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.calibrate.runner import Domain, calibrate
    from moemerge.config import load_recipe
    from moemerge.diagnose.evaluate import diagnose
    from moemerge.diagnose.options import DiagnoseOptions
    from moemerge.diagnose.report import headline_note, headline_table
    from moemerge.pipeline.stage1 import merge_checkpoints

    root = HERE / "checkpoints" / args.family
    if not (root / "base").is_dir():
        raise SystemExit(f"{root}: no shipped specialists; build them with build.py")
    start = time.time()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(args.family, args.method), sort_keys=False))
    section = load_recipe(path).calibrate
    domains = [Domain(source, tuple(files)) for source, files in section.domains.items()]
    harc_only = CalibrationOptions.model_validate(section.model_dump(exclude={"domains"}))
    with_experts = harc_only.model_copy(update={"experts": True})
    progress = not args.quiet
    folders = {STAGE1: out.parent / f"{out.name}.stage1", HARC: out.parent / f"{out.name}.harc", EXPERTS: out}
    # moemerge resumes from OUT.work when its fingerprint (paths, options, text) matches, even if the checkpoints
    # behind those paths were rebuilt since: the demo always starts fresh
    for folder in folders.values():
        shutil.rmtree(folder.parent / f"{folder.name}.work", ignore_errors=True)

    stage1 = merge_checkpoints(path, folders[STAGE1], overwrite=True, progress=progress)
    for step, options in ((HARC, harc_only), (EXPERTS, with_experts)):
        calibrate(str(stage1), domains, folders[step], options, overwrite=True, progress=progress)
    stage1_name = f"{STAGE1} ({args.method})"
    candidates = {BASE: root / "base", stage1_name: stage1, HARC: folders[HARC], EXPERTS: folders[EXPERTS]}
    diagnose_options = DiagnoseOptions(
        data=harc_only.data,
        batch_tokens=harc_only.batch_tokens,
        stage1=stage1_name,
        oracle_routers=True,
        oracle_for=[stage1_name],  # + HARC changes only routers: its oracle rows would repeat these
    )
    report = diagnose(candidates, domains, out / "report", diagnose_options, overwrite=True, progress=progress)

    steps = f"{args.method}, then HARC, then experts + HARC"
    print(f"\n{args.family}: {steps}; held-out text, {HELDOUT} samples per domain\n")
    print(headline_table(report, story_rows(args.method)))
    print("\n" + "\n".join(f"- {line}" for line in repairs(report, args.method)))
    print("\n" + headline_note(report))
    print(f"\nmodel: {out}  report: {out / 'report' / 'report.md'}  wall time: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
