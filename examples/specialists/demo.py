"""The main job on the shipped specialists: merge, calibrate with HARC, diagnose with oracle routers.

    python examples/specialists/demo.py [--family olmoe] [--method task_arithmetic] [-o out/specialists-demo]

Loads the base and the three specialists in `checkpoints/<family>/` (built by build.py, nothing is
trained here), writes a `moemerge run` recipe (stage 1 with one method, stage 2 HARC on each
domain's calibration text, diagnose on its held-out text with the sources' routers swapped in as the
ceiling) and runs it, then prints the report's headline table: per domain the held-out loss (and
its difference to the specialist) and the top-1 routing agreement with the specialist, for the
stage-1 merge, the stage-1 merge with oracle routers, the calibrated model, and the calibrated model
with oracle routers (the same as the stage-1 oracle row: HARC changes only routers).
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


def recipe(
    family: str, method: str, parameters: dict | None = None, harc: dict | None = None, samples: int = CALIBRATION
) -> dict:
    """The `moemerge run` recipe of one stage-1 method on the shipped specialists of `family`."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="olmoe", help="Folder under checkpoints/ (olmoe, glm4_moe).")
    parser.add_argument("--method", default="task_arithmetic", help="Stage-1 method (moemerge's registry).")
    parser.add_argument("-o", "--out", type=Path, default=Path("out/specialists-demo"))
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: more threads cost more)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from moemerge.diagnose.report import headline_note, headline_table, load_report
    from moemerge.pipeline.run import run_recipe

    if not (HERE / "checkpoints" / args.family / "base").is_dir():
        raise SystemExit(f"{HERE / 'checkpoints' / args.family}: no shipped specialists; build them with build.py")
    start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.parent / f"{args.out.name}.recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(args.family, args.method), sort_keys=False))
    # moemerge resumes from OUT.work when its fingerprint (paths, options, text) matches, even if the checkpoints
    # behind those paths were rebuilt since: the demo always starts fresh
    shutil.rmtree(args.out.parent / f"{args.out.name}.work", ignore_errors=True)
    model = run_recipe(path, args.out, overwrite=True, progress=not args.quiet)
    report = load_report(model / "report")
    print(
        f"\n{args.family}: {args.method} (stage 1) then HARC (stage 2); held-out text, {HELDOUT} samples per domain\n"
    )
    print(headline_table(report))
    print("\n" + headline_note(report))
    print(f"\nmodel: {model}  report: {model / 'report' / 'report.md'}  wall time: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
