"""Small data on many ranks: a domain with fewer batches than ranks is split a sample per batch, not refused.

torchrun with 2 CPU ranks calibrates two domains of three short samples each, one batch apiece at
the default batch size: the result equals the single-process run (routers to 1e-6 relative with
the float64 solver, every other tensor bit for bit). Fewer samples than ranks is still an error,
naming the domain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_specialists

from moemerge.architectures.layout import load_layout
from moemerge.calibrate.options import CalibrationOptions, RouterSolveOptions
from moemerge.calibrate.runner import Domain, calibrate
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.data import DataOptions, batches, load_domain
from moemerge.distributed import Ranks

BATCH_TOKENS = 4096


def test_fewer_samples_than_ranks_is_refused_naming_the_domain() -> None:
    with pytest.raises(ValueError, match=r"^code: 1 item\(s\) for 2 ranks, even with one sample per batch"):
        Ranks(0, 2).shard(["only batch"], [10], "code")
    assert Ranks(1, 2).shard(["a", "b", "c"], [5, 9, 4], "code") == ["a", "c"]  # balanced by size


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and sys.platform == "linux"),
    reason="needs torch.distributed with gloo",
)
def test_two_ranks_on_one_batch_per_domain_equal_one_process(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    setup = make_specialists("olmoe", tmp_path)
    data = []
    for path in setup["data"]:  # the first three samples of each domain
        small = path.with_name(f"small_{path.name}")
        small.write_text("\n".join(path.read_text().splitlines()[:3]))
        data.append(small)
    tokenizer = AutoTokenizer.from_pretrained(setup["average"])
    for path in data:
        calibration = load_domain(str(path), [str(path)], tokenizer, DataOptions(max_length=64))[0]
        assert len(list(batches(calibration, BATCH_TOKENS, 0))) == 1 < 2 <= len(calibration.samples)

    options = CalibrationOptions(
        data=DataOptions(max_length=64), batch_tokens=BATCH_TOKENS, harc=RouterSolveOptions(dtype="float64")
    )
    domains = [Domain(str(s), (str(d),)) for s, d in zip(setup["sources"], data, strict=True)]
    single = calibrate(str(setup["average"]), domains, tmp_path / "single", options, progress=False)

    out = tmp_path / "two_ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    command += ["moemerge", "calibrate", "--merged", str(setup["average"]), "-o", str(out)]
    for source, path in zip(setup["sources"], data, strict=True):
        command += ["--source", str(source), "--data", f"{source}={path}"]
    command += ["--max-length", "64", "--batch-tokens", str(BATCH_TOKENS), "--dtype", "float64"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    routers = load_layout(single).router_tensors
    a, b = CheckpointReader(single), CheckpointReader(out)
    assert a.names() == b.names()
    for name in a.names():
        x, y = a.read(name), b.read(name)
        if name in routers:
            assert ((x.double() - y.double()).norm() / x.double().norm()).item() <= 1e-6, name
        else:
            assert torch.equal(x, y), name
    layers = json.loads((out / "moemerge_calibration.json").read_text())["layers"]
    reference = json.loads((single / "moemerge_calibration.json").read_text())["layers"]
    for ours, theirs in zip(layers, reference, strict=True):  # every rank's tokens counted once
        assert {d: v["tokens"] for d, v in ours["domains"].items()} == {
            d: v["tokens"] for d, v in theirs["domains"].items()
        }
