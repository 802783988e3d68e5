"""Kill `moemerge run` anywhere: no output or a complete one, and the rerun ends byte-identical to an uninterrupted run.

One uninterrupted run (during which a second `run` into the same output is refused, naming it)
is the reference. Then one output goes through a chain of interrupted attempts, each killed with
SIGKILL at a random moment (seeded) inside a phase: stage 1 (its shard folder exists), the walk
(a layer is finished), diagnose (the calibrated model is written, not yet moved into place), and
anywhere (a random time after the start); twice in the chain the disk refuses a write instead
(RLIMIT_FSIZE): first in stage 1, then, with stage 1 done, in the calibrated model's output (if
the walk's kill came before that was written, as it does unless the machine stalls the killer).
After every attempt the output and the stage-1 output are either absent or complete (equal to the
reference's); the last rerun finishes, and its folders equal the reference's byte for byte (the
timings in moemerge_calibration.json aside). `benchmarks/kill_anywhere.py` sweeps many more
kill moments.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import folder_contents, make_specialists, write_run_recipe

from moemerge.cli import main

OUT = "merged"


def start(cwd: Path, recipe: Path, limit: int | None = None) -> subprocess.Popen:
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen(
        [sys.executable, "-m", "moemerge", "run", str(recipe), "-o", OUT, "--quiet"],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_file_size if limit is not None else None,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kill")
    setup = make_specialists("olmoe", root)
    path = write_run_recipe(setup, root)
    (root / "reference").mkdir()
    began = time.monotonic()
    process = start(root / "reference", path)
    lock = root / "reference" / f".{OUT}.lock"
    while not lock.exists() and process.poll() is None:
        time.sleep(0.005)
    second = subprocess.run(  # the same command while the first holds the output
        [sys.executable, "-m", "moemerge", "run", str(path), "-o", OUT, "--quiet"],
        cwd=root / "reference",
        capture_output=True,
        text=True,
    )
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return {
        "root": root,
        "recipe": path,
        "seconds": time.monotonic() - began,
        "second": second,
        "first_pid": process.pid,
        OUT: folder_contents(root / "reference" / OUT),
        f"{OUT}.stage1": folder_contents(root / "reference" / f"{OUT}.stage1"),
    }


def test_a_second_run_into_the_same_output_is_refused(reference: dict) -> None:
    second = reference["second"]
    assert second.returncode == 1
    line = second.stderr.strip().splitlines()[-1]
    assert "in use by another moemerge run (pid" in line, line
    assert f"pid {reference['first_pid']} " in line and f"-m moemerge run {reference['recipe']} -o {OUT}" in line, line


def test_killed_anywhere_then_rerun_is_byte_identical(reference: dict) -> None:
    cwd = reference["root"] / "killed"
    cwd.mkdir()
    rng = random.Random(17)
    phases: list[tuple[str, Callable[[], bool], float]] = [
        ("stage 1", lambda: any(cwd.glob(f".{OUT}.stage1.partial-*")), 0.1),
        ("walk", lambda: (cwd / f"{OUT}.work" / "layer_0000.safetensors").exists(), 0.1),
        ("diagnose", lambda: any(cwd.glob(f".{OUT}.run-*/{OUT}")), 2.0),
        ("anywhere", lambda: True, reference["seconds"]),
    ]
    outcomes = []

    def check_outputs(after: str) -> str:
        states = []
        for name in (OUT, f"{OUT}.stage1"):
            if (cwd / name).exists():
                assert folder_contents(cwd / name) == reference[name], f"{name} incomplete after {after}"
                states.append(f"{name} complete")
            else:
                states.append(f"{name} absent")
        return ", ".join(states)

    def refused_write(folder: str) -> None:
        process = start(cwd, reference["recipe"], limit=100_000)  # the tiny model's shard is 300 KB
        _, stderr = process.communicate(timeout=600)
        lines = [line for line in stderr.splitlines() if line.startswith("moemerge: error:")]
        assert process.returncode == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert f"{OUT}{folder}: writing failed (File too large)" in lines[0], lines[0]
        outcomes.append(f"disk full: {lines[0].split(': error: ')[1]} -> {check_outputs('a refused write')}")

    def kill_in(phase: str, entered: Callable[[], bool], spread: float) -> None:
        process = start(cwd, reference["recipe"])
        while not entered() and process.poll() is None:
            time.sleep(0.001)
        delay = rng.uniform(0, spread)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.001)
        finished = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=600)
        what = "finished before the kill" if finished else "killed"
        outcomes.append(f"{phase} + {delay:.2f} s: {what} -> {check_outputs(phase)}")

    refused_write(".stage1")
    kill_in(*phases[0])
    kill_in(*phases[1])
    if not any(cwd.glob(f".{OUT}.run-*/{OUT}")):  # the walk was killed before its output was written
        refused_write("")  # stage 1 done: the calibrated model is the first large write
    kill_in(*phases[2])
    if (cwd / OUT).exists():  # diagnose finished before its kill: start the last kill from stage 1's output only
        shutil.rmtree(cwd / OUT)
    kill_in(*phases[3])
    if (cwd / OUT).exists():  # a kill that came after the run finished: complete, and checked as such above
        outcomes.append("rerun: not needed, the output is complete")
    else:
        final = start(cwd, reference["recipe"])
        _, stderr = final.communicate(timeout=600)
        assert final.returncode == 0, stderr[-3000:]
        outcomes.append(f"rerun: {check_outputs('the rerun')}")
    print("\n".join(outcomes))
    assert (cwd / OUT).is_dir() and (cwd / f"{OUT}.stage1").is_dir()
    leftovers = sorted(p.name for p in cwd.iterdir() if p.name.startswith(f".{OUT}"))
    assert not leftovers, leftovers
    assert main(["run", str(reference["recipe"]), "-o", str(cwd / OUT), "--quiet"]) == 1  # complete: not redone
