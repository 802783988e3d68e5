"""A disk that refuses a write part way: one-line error naming the output, nothing left behind, resumable work.

The command runs in a subprocess under a file-size limit (RLIMIT_FSIZE, set in `preexec_fn`):
the kernel then fails the real `write` that crosses the limit with EFBIG, as a full disk fails
one with ENOSPC. Python ignores the SIGXFSZ that comes with it, so the error reaches moemerge.

Cases: `merge` into a new output, `merge --overwrite` over an existing one (left byte for byte
as it was), `calibrate` failing on its first work-folder layer and then on the output (each
rerun resumes; the final output equals an uninterrupted run's). `run` is in
tests/test_reliability_kill.py, beside the uninterrupted run it is compared with.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_specialists

from moemerge.cli import main


def moemerge(*args: str, limit: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m moemerge ARGS`, its files limited to `limit` bytes each."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "moemerge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=limit_file_size if limit is not None else None,
    )


def refused_write(result: subprocess.CompletedProcess, folder: Path) -> str:
    """The run failed with exactly one error line naming `folder` and the refused write."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("moemerge: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert f"{folder}: writing failed (File too large)" in lines[0], lines[0]
    return lines[0]


def hidden_leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_specialists("olmoe", tmp_path_factory.mktemp("disk"))


def test_merge_on_a_full_disk(setup: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    sources = [{"model": str(s), "parameters": {"weight": 0.5}} for s in setup["sources"]]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": sources, "dtype": "float32"}))
    out = tmp_path / "out"
    assert (setup["base"] / "model.safetensors").stat().st_size > 200_000  # the shard crosses the limit

    line = refused_write(moemerge("merge", str(recipe), "-o", str(out), "--quiet", limit=100_000), out)
    assert line.endswith("the output was not written"), line
    assert not out.exists() and not hidden_leftovers(tmp_path, "out")

    assert moemerge("merge", str(recipe), "-o", str(out), "--quiet").returncode == 0
    before = file_bytes(out)
    recipe.write_text(recipe.read_text().replace("0.5", "0.25"))  # a different merge, refused part way
    refused_write(moemerge("merge", str(recipe), "-o", str(out), "--overwrite", "--quiet", limit=100_000), out)
    assert file_bytes(out) == before, "the existing output was changed"
    assert not hidden_leftovers(tmp_path, "out")


def test_calibrate_on_a_full_disk_resumes(setup: dict, tmp_path: Path) -> None:
    def arguments(out: Path) -> list[str]:
        args = ["calibrate", "--merged", str(setup["average"]), "-o", str(out), "--max-length", "48"]
        for source, data in zip(setup["sources"], setup["data"], strict=True):
            args += ["--source", str(source), "--data", f"{source}={data}"]
        return [*args, "--batch-tokens", "256"]

    def calibrate(out: Path, limit: int | None = None) -> subprocess.CompletedProcess:
        return moemerge(*arguments(out), limit=limit)

    reference = tmp_path / "reference"
    assert main(arguments(reference)) == 0  # in this process: one thread, as the subprocesses
    out, work = tmp_path / "out", tmp_path / "out.work"
    layer = reference.parent / "reference.work" / "layer_0000.safetensors"

    line = refused_write(calibrate(out, limit=layer.stat().st_size // 2), work)  # the first finished layer
    assert line.endswith("finished layers are kept: rerun to resume"), line
    assert not out.exists() and not list(work.glob("layer_*.safetensors"))

    line = refused_write(calibrate(out, limit=100_000), out)  # every layer fits, the output does not
    assert not out.exists() and not hidden_leftovers(tmp_path, "out")
    assert len(list(work.glob("layer_*.safetensors"))) == 3

    assert calibrate(out).returncode == 0  # resumes: replays the three layers, writes the output
    for shard in reference.glob("*.safetensors"):
        assert shard.read_bytes() == (out / shard.name).read_bytes()
