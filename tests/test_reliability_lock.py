"""Two runs, one output: the second is refused with a message naming the first (pid, host, command).

Cases: `merge`, `run` and `calibrate` into an output another process holds, `calibrate` into a
work folder another process holds; a holder killed with SIGKILL (its lock file stays) does not
block the next run; nested locks in one process; a run killed mid-replacement of an existing
output gets it back. A real `moemerge run` holding its output against a second one is in
tests/test_reliability_kill.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from moemerge.checkpoint.lock import folder_lock, lock_file
from moemerge.cli import main

HOLDER = """
import sys
from moemerge.checkpoint.lock import folder_lock

with folder_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator:
    """Start a process that holds a folder's lock until its stdin closes (or it is killed)."""
    script = tmp_path / "hold_folder.py"
    script.write_text(HOLDER)
    started: list[subprocess.Popen] = []

    def hold(folder: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, str(script), str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "held"
        started.append(process)
        return process

    yield hold
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def refusal(capsys: pytest.CaptureFixture, argv: list[str], process: subprocess.Popen, folder: Path) -> str:
    assert main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"moemerge: error: {folder.absolute()}: in use by another moemerge run"), line
    assert f"pid {process.pid} on {socket.gethostname()}" in line and f"hold_folder.py {folder}" in line, line
    return line


def recipe_file(tmp_path: Path, tiny_olmoe: Path, calibrate: bool = False) -> Path:
    recipe = {"merge_method": "linear", "models": [{"model": str(tiny_olmoe), "parameters": {"weight": 1.0}}]}
    if calibrate:
        recipe["calibrate"] = {"domains": {str(tiny_olmoe): [str(tmp_path / "text.txt")]}}
        (tmp_path / "text.txt").write_text("A few words of calibration text.")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_and_run_into_a_held_output_are_refused(tmp_path, tiny_olmoe, holder, capsys) -> None:
    out = tmp_path / "out"
    process = holder(out)
    refusal(capsys, ["merge", str(recipe_file(tmp_path, tiny_olmoe)), "-o", str(out), "--quiet"], process, out)
    run = ["run", str(recipe_file(tmp_path, tiny_olmoe, calibrate=True)), "-o", str(out), "--quiet"]
    refusal(capsys, run, process, out)
    assert not out.exists()

    process.stdin.close()  # the holder finishes and releases: the same command now runs
    assert process.wait() == 0 and not lock_file(out).exists()
    assert main(["merge", str(recipe_file(tmp_path, tiny_olmoe)), "-o", str(out), "--quiet"]) == 0
    assert not lock_file(out).exists()


def test_calibrate_into_a_held_output_or_work_folder_is_refused(tmp_path, tiny_olmoe, holder, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Some calibration text.")
    args = ["calibrate", "--merged", str(tiny_olmoe), "--source", str(tiny_olmoe), "--data", f"{tiny_olmoe}={text}"]
    out, work = tmp_path / "out", tmp_path / "shared.work"
    refusal(capsys, [*args, "-o", str(out)], holder(out), out)
    refusal(capsys, [*args, "-o", str(tmp_path / "other"), "--work-dir", str(work)], holder(work), work)
    assert not out.exists() and not (tmp_path / "other").exists()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path, tiny_olmoe, holder) -> None:
    out = tmp_path / "out"
    process = holder(out)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert lock_file(out).exists()  # the file stays; the kernel dropped the lock with the process
    with folder_lock(out):
        assert str(os.getpid()) in lock_file(out).read_text()
    assert not lock_file(out).exists()


def test_nested_locks_and_a_second_holder_in_the_same_process(tmp_path) -> None:
    """One process may take a folder's lock again (run, then the calibrate it calls); the file lives until the outer
    block ends, and another open file description of it (what a second process has) cannot lock it meanwhile."""
    import fcntl

    folder = tmp_path / "out"
    with folder_lock(folder):
        with folder_lock(folder):
            pass
        assert lock_file(folder).exists()
        fd = os.open(lock_file(folder), os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not lock_file(folder).exists()


def test_an_output_moved_aside_by_a_killed_replacement_is_restored(tmp_path) -> None:
    out = tmp_path / "out"
    aside = tmp_path / ".out.old-1234abcd"  # killed between moving the old output aside and the new one in
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"old")
    unfinished = tmp_path / ".out.tmp-5678abcd"
    unfinished.mkdir()
    with folder_lock(out):
        assert (out / "model.safetensors").read_bytes() == b"old"
        assert not aside.exists() and not unfinished.exists()


def test_run_reusing_stage_1_takes_over_the_lock_a_killed_stage_1_left(tmp_path, tiny_olmoe, holder) -> None:
    """A run that reuses OUT.stage1 (kept by a killed run of the same inputs) holds its lock too, so the lock file a
    killed holder left beside it is taken over and removed, not left behind, and a live holder is still refused."""
    recipe, out = recipe_file(tmp_path, tiny_olmoe, calibrate=True), tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "--quiet"]) == 0
    stage1 = tmp_path / "out.stage1"
    shutil.rmtree(out)  # as if killed after stage 1: OUT.stage1 and its key in OUT.work are kept
    process = holder(stage1)
    assert main(["run", str(recipe), "-o", str(out), "--quiet"]) == 1 and not out.exists()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert lock_file(stage1).exists()
    assert main(["run", str(recipe), "-o", str(out), "--quiet"]) == 0
    assert out.is_dir() and not lock_file(stage1).exists() and not lock_file(out).exists()
