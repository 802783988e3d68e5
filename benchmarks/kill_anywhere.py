"""Kill `moemerge run` at many random moments: is the output always absent or complete, and the rerun identical?

The sweep behind tests/test_reliability_kill.py (which tries six moments to stay fast). On the
tiny OLMoE specialists of the tests: one uninterrupted run is the reference and its wall time T;
then for each of N kill moments drawn uniformly from [0, T] (seeded), a fresh folder gets a run
killed (SIGKILL) at that moment, its output and stage-1 output are checked (absent, or equal to
the reference's), and a rerun completes it, which must equal the reference byte for byte (the
solve timings in moemerge_calibration.json aside). Each row says where the kill landed, read off
the folders at that moment.

    python benchmarks/kill_anywhere.py [--kills 30] [--seed 0] [--workdir /tmp/moemerge-kill]

A table, not a test: where the kills land depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny models and helpers
from conftest import folder_contents, make_specialists, write_run_recipe  # noqa: E402

OUT = "merged"


def build(workdir: Path) -> Path:
    """The tests' tiny specialists (tests/conftest.py) and a run recipe; returns the recipe."""

    models = workdir / "models"
    if models.exists():
        shutil.rmtree(models)
    setup = make_specialists("olmoe", models)
    path = write_run_recipe(setup, workdir)
    return path


def run(cwd: Path, recipe: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moemerge", "run", str(recipe), "-o", OUT, "--quiet"],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def phase(cwd: Path) -> str:
    """Where a run in `cwd` stands, from its folders."""
    if (cwd / OUT).exists():
        return "done"
    if any(cwd.glob(f".{OUT}.run-*/{OUT}")):
        return "diagnose"
    layers = len(list((cwd / f"{OUT}.work").glob("layer_*.safetensors")))
    if (cwd / f"{OUT}.stage1").exists():
        return f"walk ({layers} layers done)"
    if any(cwd.glob(f".{OUT}.stage1.partial-*")):
        return "stage 1"
    return "start-up"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-kill"))
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = build(args.workdir)
    reference = args.workdir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir()
    began = time.monotonic()
    if run(reference, recipe).wait() != 0:
        raise SystemExit("the reference run failed")
    seconds = time.monotonic() - began
    expected = {name: folder_contents(reference / name) for name in (OUT, f"{OUT}.stage1")}

    rng = random.Random(args.seed)
    rows = []
    for k in range(args.kills):
        cwd = args.workdir / f"kill-{k:03d}"
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir()
        at = rng.uniform(0, seconds)
        process = run(cwd, recipe)
        deadline = time.monotonic() + at
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.001)
        landed = phase(cwd) if process.poll() is None else "finished first"
        process.send_signal(signal.SIGKILL)
        process.wait()
        states = []
        for name, want in expected.items():
            if not (cwd / name).exists():
                states.append("absent")
            else:
                states.append("complete" if folder_contents(cwd / name) == want else "BROKEN")
        if (cwd / OUT).exists():
            rerun = "not needed"
        else:
            status = run(cwd, recipe).wait()
            same = status == 0 and all(folder_contents(cwd / n) == want for n, want in expected.items())
            rerun = "identical" if same else f"DIFFERS (status {status})"
        rows.append((at, landed, *states, rerun))
        print(
            f"{k + 1}/{args.kills}: kill at {at:.2f} s in {landed}: {OUT} {states[0]}, stage 1 {states[1]}, "
            f"rerun {rerun}",
            file=sys.stderr,
        )
        shutil.rmtree(cwd)

    print(f"\nuninterrupted run: {seconds:.1f} s; {args.kills} kills at uniform random moments (seed {args.seed})\n")
    print(f"kill at s | landed in | {OUT} after the kill | {OUT}.stage1 after the kill | rerun")
    print("--- | --- | --- | --- | ---")
    for at, landed, out, stage1, rerun in sorted(rows):
        print(f"{at:.2f} | {landed} | {out} | {stage1} | {rerun}")
    bad = [row for row in rows if "BROKEN" in row or row[-1].startswith("DIFFERS")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} kills: output absent or complete, rerun identical")


if __name__ == "__main__":
    main()
