"""A killed stage 1 restarts from the shards it finished; its output is an uninterrupted run's, byte for byte.

Cases: `moemerge merge` killed (SIGKILL) after a few of its ~100 shards, rerun: the finished
shards are adopted as they are (same inode) and the folder equals an uninterrupted merge; a rerun
with another recipe does not adopt them (they are removed). Under torchrun, rank 1 killed mid-merge:
the job fails, the shards stay, and the rerun equals the single-process merge. The stage 1 of
`moemerge run` is covered by tests/test_reliability_kill.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from conftest import make_specialists, rank_pid

from moemerge.cli import main

SHARD = "20KB"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """About 3.6 MB of bfloat16 weights: a hundred 20 KB shards, so a kill lands between shards."""
    sizes = {"num_hidden_layers": 8, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64}
    return make_specialists("olmoe", tmp_path_factory.mktemp("resume"), **sizes)


def write_recipe(setup: dict, path: Path, weight: float = 0.7) -> Path:
    recipe = {
        "merge_method": "dare_ties",  # seeded random masks: a rerun draws the same
        "base_model": str(setup["base"]),
        "models": [{"model": str(s), "parameters": {"weight": weight, "density": 0.6}} for s in setup["sources"]],
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def same_files(left: Path, right: Path) -> None:
    names = sorted(p.name for p in left.iterdir())
    assert names == sorted(p.name for p in right.iterdir())
    for name in names:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


def kill_after_shards(command: list[str], partial_glob: Path, shards: int, victim=None, **popen) -> list[Path]:
    """Start `command`, SIGKILL it (or `victim()`'s pid) once `shards` shards are finished; the finished ones."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    pid = victim() if victim is not None else process.pid
    while process.poll() is None:
        finished = sorted(partial_glob.parent.glob(f"{partial_glob.name}/shard-*.safetensors"))
        if len(finished) >= shards:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    process.communicate(timeout=300)
    assert process.returncode != 0, "the merge finished before it could be killed"
    return sorted(partial_glob.parent.glob(f"{partial_glob.name}/shard-*.safetensors"))


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_killed_merge_resumes_byte_identical(setup: dict, tmp_path: Path) -> None:
    recipe = write_recipe(setup, tmp_path / "recipe.yaml")
    reference = tmp_path / "reference"
    assert main(["merge", str(recipe), "-o", str(reference), "--max-shard-size", SHARD, "--quiet"]) == 0
    total = len(list(reference.glob("*.safetensors")))
    assert total >= 50

    out = tmp_path / "out"
    command = [sys.executable, "-m", "moemerge", "merge", str(recipe), "-o", str(out), "--max-shard-size", SHARD]
    finished = kill_after_shards(command, tmp_path / ".out.partial-*", 3, env=env())
    assert not out.exists()
    assert 3 <= len(finished) < total, (len(finished), total)
    inodes = {int(p.stem.split("-")[1]): p.stat().st_ino for p in finished}

    assert main(["merge", str(recipe), "-o", str(out), "--max-shard-size", SHARD, "--quiet"]) == 0
    same_files(reference, out)
    for k, inode in inodes.items():  # adopted, not merged again: the file itself was renamed into place
        assert (out / f"model-{k + 1:05d}-of-{total:05d}.safetensors").stat().st_ino == inode
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_shards_of_other_inputs_are_not_adopted(setup: dict, tmp_path: Path) -> None:
    recipe = write_recipe(setup, tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "moemerge", "merge", str(recipe), "-o", str(out), "--max-shard-size", SHARD]
    assert kill_after_shards(command, tmp_path / ".out.partial-*", 3, env=env())

    changed = write_recipe(setup, tmp_path / "recipe.yaml", weight=0.4)
    assert main(["merge", str(changed), "-o", str(out), "--max-shard-size", SHARD, "--quiet"]) == 0
    fresh = tmp_path / "fresh"
    assert main(["merge", str(changed), "-o", str(fresh), "--max-shard-size", SHARD, "--quiet"]) == 0
    same_files(fresh, out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and sys.platform == "linux"),
    reason="needs torch.distributed with gloo (and /proc to find a rank's process)",
)
def test_torchrun_merge_with_a_dead_rank_resumes_byte_identical(setup: dict, tmp_path: Path) -> None:
    recipe = write_recipe(setup, tmp_path / "recipe.yaml")
    reference = tmp_path / "reference"
    assert main(["merge", str(recipe), "-o", str(reference), "--max-shard-size", SHARD, "--quiet"]) == 0

    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    command = [*torchrun, "moemerge", "merge", str(recipe), "-o", str(out), "--max-shard-size", SHARD, "--quiet"]
    tag = uuid.uuid4().hex
    finished = kill_after_shards(
        command,
        tmp_path / ".out.partial-*",
        4,
        victim=lambda: rank_pid(tag, 1),
        env=env() | {"MOEMERGE_TEST_TAG": tag},
    )
    assert not out.exists() and finished, "the shards of the ranks were not kept for the restart"
    inodes = {p.name: p.stat().st_ino for p in finished}

    result = subprocess.run(command, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    same_files(reference, out)
    total = len(list(reference.glob("*.safetensors")))
    adopted = {
        f"model-{int(name.split('-')[1].split('.')[0]) + 1:05d}-of-{total:05d}.safetensors": inode
        for name, inode in inodes.items()
    }
    kept = [name for name, inode in adopted.items() if (out / name).stat().st_ino == inode]
    assert kept, "no finished shard was adopted by the restart"
