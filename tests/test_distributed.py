"""torchrun with 2 CPU ranks (gloo) gives the single-process results; a dead rank fails the run; plans fit budgets.

The torchrun tests start `python -m torch.distributed.run --standalone --nproc-per-node 2 -m moemerge ...`
as a subprocess (about half a minute each on two cores): stage 1 must be byte-identical to a
single-process merge, calibrated routers equal to 1e-6 relative (float64 solver work dtype, so
that the comparison tests the reductions and not float32 rounding; docs/SCALING.md gives the
float32 figures).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import make_specialists, rank_pid

from moemerge.architectures.layout import load_layout
from moemerge.calibrate.memory import MemoryBudget, ModelShape, parse_budget, plan_memory, rank_tokens
from moemerge.calibrate.options import CalibrationOptions, RouterSolveOptions
from moemerge.calibrate.runner import SUMMARY_FILE, Calibrator, Domain, calibrate
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.cli import main
from moemerge.data import DataOptions
from moemerge.distributed import Ranks, assign_shards
from moemerge.merge.distributed import plan_shards

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and sys.platform == "linux"),
    reason="needs torch.distributed with gloo (and /proc to find a rank's process)",
)

OPTIONS = CalibrationOptions(
    data=DataOptions(max_length=64), batch_tokens=256, harc=RouterSolveOptions(dtype="float64")
)
FLAGS = ["--max-length", "64", "--batch-tokens", "256", "--dtype", "float64"]


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "moemerge",
    ] + [*args]


def _errors(stderr: str) -> str:
    """The ranks' own error lines (torchrun's summary alone would push them out of a short message)."""
    lines = [line for line in stderr.splitlines() if "error" in line.lower() or "[rank" in line]
    return "\n".join(lines[-40:])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _domains(setup: dict) -> list[Domain]:
    return [Domain(str(s), (str(f),)) for s, f in zip(setup["sources"], setup["data"], strict=True)]


def _calibrate_args(setup: dict, out: Path) -> list[str]:
    args = ["calibrate", "--merged", str(setup["average"]), "-o", str(out)]
    for source, data in zip(setup["sources"], setup["data"], strict=True):
        args += ["--source", str(source), "--data", f"{source}={data}"]
    return args + FLAGS


def _assert_same_routers(single: Path, distributed: Path) -> None:
    routers = load_layout(single).router_tensors
    a, b = CheckpointReader(single), CheckpointReader(distributed)
    assert a.names() == b.names()
    for name in a.names():
        x, y = a.read(name), b.read(name)
        if name in routers:
            error = ((x.double() - y.double()).norm() / x.double().norm()).item()
            assert error <= 1e-6, (name, error)
        else:
            assert torch.equal(x, y), name


def _same_bytes(left: Path, right: Path) -> None:
    names = sorted(p.name for p in left.iterdir())
    assert names == sorted(p.name for p in right.iterdir())
    for name in names:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_specialists("olmoe", tmp_path_factory.mktemp("distributed"), num_hidden_layers=6)


@pytest.fixture(scope="module")
def distributed_run(setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torchrun") / "calibrated"
    result = subprocess.run(torchrun(*_calibrate_args(setup, out)), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, _errors(result.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# torchrun, 2 ranks


@needs_gloo
def test_distributed_calibration_matches_single_process(setup: dict, distributed_run: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: same forward arithmetic
    try:
        single = calibrate(str(setup["average"]), _domains(setup), tmp_path / "single", OPTIONS, progress=False)
    finally:
        torch.set_num_threads(threads)
    _assert_same_routers(single, distributed_run)
    one, two = (json.loads((p / SUMMARY_FILE).read_text())["layers"] for p in (single, distributed_run))
    assert len(one) == len(two) == 6
    for a, b in zip(one, two, strict=True):
        assert a["iterations"] == b["iterations"]
        for name, domain in a["domains"].items():
            assert domain["tokens"] == b["domains"][name]["tokens"]  # summed over ranks
            for key in ("agreement_before", "agreement_after"):
                assert domain[key] == pytest.approx(b["domains"][name][key], abs=1e-12), (name, key)


@needs_gloo
def test_dead_rank_fails_the_run_and_the_rerun_resumes(setup: dict, distributed_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tag = uuid.uuid4().hex
    command = torchrun(*_calibrate_args(setup, out))
    process = subprocess.Popen(
        command, env=_env(MOEMERGE_TEST_TAG=tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rank1 = rank_pid(tag, 1)
    second_layer = tmp_path / "out.work" / "layer_0001.safetensors"
    while not second_layer.exists() and process.poll() is None:
        time.sleep(0.002)
    os.kill(rank1, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert not out.exists(), "the run finished before rank 1 could be killed; the test needs slower layers"
    assert not list(tmp_path.glob(".out.tmp-*")), "a half-written output folder was left behind"
    assert "rank      : 1" in stderr and "SIGKILL" in stderr, stderr[-3000:]  # torchrun names the dead rank
    finished = sorted(p.name for p in (tmp_path / "out.work").glob("layer_*.safetensors"))
    assert "layer_0001.safetensors" in finished and "layer_0005.safetensors" not in finished

    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, _errors(result.stderr)
    for shard in distributed_run.glob("*.safetensors"):  # resumed = uninterrupted, byte for byte
        assert shard.read_bytes() == (out / shard.name).read_bytes()


@needs_gloo
def test_distributed_experts_match_single_process_and_resume(setup: dict, tmp_path: Path) -> None:
    """RegMean of the experts on 2 ranks, in groups of 2: the sums reduced over the ranks give the single process's
    experts (to the rounding of the order they are summed in). Each rank writes and reads back its own copy of
    each group of new experts (rank 0's work folder need not be shared with rank 1); a rerun replays the finished
    layers from rank 0's group files, broadcast to rank 1, and ends byte-identical."""
    from moemerge.calibrate.memory import ModelShape, expert_sums_bytes

    two = expert_sums_bytes(ModelShape.of(load_layout(setup["average"]), CheckpointReader(setup["average"]))) * 2
    regmean = OPTIONS.regmean.model_copy(update={"sums_budget_bytes": two})
    options = OPTIONS.model_copy(update={"experts": True, "regmean": regmean})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = calibrate(str(setup["average"]), _domains(setup), tmp_path / "single", options, progress=False)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "dist"
    command = torchrun(*_calibrate_args(setup, out), "--experts", "--sums-budget-bytes", str(two))
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, _errors(result.stderr)
    work = tmp_path / "dist.work"
    assert len(list(work.glob("layer_0000.regmean.experts.*.safetensors"))) == 4  # 4 experts: 2 groups x 2 maps
    a, b = CheckpointReader(single), CheckpointReader(out)
    assert a.names() == b.names()
    experts = [n for n in a.names() if ".experts." in n]
    stage1 = CheckpointReader(setup["average"])
    assert any(not torch.equal(a.read(n), stage1.read(n)) for n in experts)
    for name in a.names():
        x, y = a.read(name).double(), b.read(name).double()
        assert (x - y).norm() <= 1e-5 * x.norm(), name

    for path in work.glob("layer_000[3-5]*"):  # layers 3-5 unfinished: their routers and experts redone
        path.unlink()
    for path in work.glob("layer_000[12].*"):  # layers 1-2: experts finished (replayed), routers redone
        if ".regmean." not in path.name:
            path.unlink()
    again = tmp_path / "again"
    result = subprocess.run(
        torchrun(*_calibrate_args(setup, again), "--work-dir", str(work), "--experts", "--sums-budget-bytes", str(two)),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, _errors(result.stderr)
    for shard in out.glob("*.safetensors"):
        assert shard.read_bytes() == (again / shard.name).read_bytes(), shard.name


def _write_recipe(setup: dict, path: Path, calibrate_section: bool) -> Path:
    sources = [str(s) for s in setup["sources"]]
    recipe = {
        "merge_method": "dare_ties",  # random masks: seeded per tensor, so any rank draws the same
        "base_model": str(setup["base"]),
        "models": [{"model": s, "parameters": {"weight": 0.7, "density": 0.6}} for s in sources],
        "dtype": "bfloat16",
    }
    if calibrate_section:
        recipe["calibrate"] = {
            "domains": {s: [str(f)] for s, f in zip(sources, setup["data"], strict=True)},
            "data": {"max_length": 64, "heldout": 0.25},
            "batch_tokens": 256,
            "harc": {"dtype": "float64"},
        }
    path.write_text(yaml.safe_dump(recipe))
    return path


@needs_gloo
def test_distributed_stage1_is_byte_identical(setup: dict, tmp_path: Path) -> None:
    recipe = _write_recipe(setup, tmp_path / "recipe.yaml", calibrate_section=False)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["merge", str(recipe), "-o", str(single), "--max-shard-size", "30KB", "--quiet"]) == 0
    assert len(list(single.glob("*.safetensors"))) >= 4
    command = torchrun("merge", str(recipe), "-o", str(sharded), "--max-shard-size", "30KB", "--quiet")
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, _errors(result.stderr)
    _same_bytes(single, sharded)


@needs_gloo
def test_distributed_run_pipeline(setup: dict, tmp_path: Path) -> None:
    """`moemerge run` under torchrun: stage 1 byte-identical, routers to 1e-6, the report written once."""
    recipe = _write_recipe(setup, tmp_path / "recipe.yaml", calibrate_section=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(recipe), "-o", str(tmp_path / "single"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    command = torchrun("run", str(recipe), "-o", str(tmp_path / "dist"), "--quiet")
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, _errors(result.stderr)
    _same_bytes(tmp_path / "single.stage1", tmp_path / "dist.stage1")
    _assert_same_routers(tmp_path / "single", tmp_path / "dist")
    assert (tmp_path / "dist" / "report" / "report.json").is_file()


# ---------------------------------------------------------------------------------------------
# Pieces, in one process


def test_assign_shards_covers_every_item_once_and_balances() -> None:
    sizes = [50, 7, 7, 30, 30, 1, 12, 12, 40]
    shards = assign_shards(sizes, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes)
    assert shards == assign_shards(sizes, 3)


def test_single_process_ranks_are_the_identity() -> None:
    ranks = Ranks()
    t = torch.arange(3.0, dtype=torch.float64)
    assert ranks.reduce(t) is t and ranks.broadcast("x") == "x" and ranks.all_gather(2) == [2]
    assert ranks.on_writer(lambda: 5) == 5 and ranks.shard([1, 2], [1, 1], "d") == [1, 2]


def test_plan_shards_packs_like_the_writer(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.zeros(int(torch.randint(1, 300, (1,), generator=gen))) for i in range(40)}
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=2000) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.finalize()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name in tensors:
        by_file.setdefault(index[name], []).append(name)
    planned = plan_shards([(n, t.numel() * 4) for n, t in tensors.items()], 2000)
    assert planned == [by_file[f] for f in sorted(by_file)]


def test_parse_budget() -> None:
    default = parse_budget(None, "cpu")  # the host's available memory, read from /proc/meminfo and cgroups
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < default.host < total and default.device is None and "available memory" in default.origin
    assert parse_budget("unlimited", "cpu") == MemoryBudget(origin="--max-memory unlimited")
    assert not parse_budget("unlimited", "cpu").limited
    assert parse_budget("2GB", "cpu") == MemoryBudget(host=2 * 10**9)
    assert parse_budget("80GiB", "cuda") == MemoryBudget(device=80 * 2**30)
    assert parse_budget("host=1GB,device=2GB", "cuda") == MemoryBudget(host=10**9, device=2 * 10**9)
    for bad, device in [("lots", "cpu"), ("ram=1GB", "cpu"), ("device=1GB", "cpu")]:
        with pytest.raises(ValueError, match="--max-memory"):
            parse_budget(bad, device)


OLMOE = ModelShape(
    hidden=2048,
    experts=64,
    top_k=8,
    heads=16,
    expert_width=1024,
    layer_numbers=420_000_000,
    resident_numbers=2 * 10**8,
    layer_disk_bytes=840_000_000,
    expert_maps=((2048, 2048), (2048, 1024)),
)
LENGTHS = [[512] * 2000, [300] * 3000]  # two domains, 1.9M tokens


def test_plan_without_budget_keeps_the_options() -> None:
    plan = plan_memory(OLMOE, LENGTHS, CalibrationOptions(), MemoryBudget())
    assert plan.apply(CalibrationOptions()) == CalibrationOptions()
    assert not plan.changes and "peak host" in plan.describe()


def test_plan_shrinks_to_fit_then_refuses() -> None:
    options = CalibrationOptions()
    full = plan_memory(OLMOE, LENGTHS, options, MemoryBudget())
    plan = plan_memory(OLMOE, LENGTHS, options, MemoryBudget(host=int(full.host_bytes * 0.7)))
    assert plan.host_bytes <= full.host_bytes * 0.7
    assert plan.activation_dtype == "bfloat16" and "activation_dtype float32 -> bfloat16" in plan.changes
    two_ranks = plan_memory(OLMOE, LENGTHS, options, MemoryBudget(host=int(full.host_bytes * 0.7)), world_size=2)
    assert two_ranks.activation_dtype == "float32"  # half the tokens per rank fit without lowering precision
    assert rank_tokens(LENGTHS, 8192, 2).real[0] == 63 * 16 * 512  # 125 batches of 16 rows
    gpu = plan_memory(OLMOE, LENGTHS, options, MemoryBudget(device=int(full.host_bytes * 0.3)), on_gpu=True)
    assert gpu.hidden_on == "host" and gpu.device_bytes <= full.host_bytes * 0.3
    with pytest.raises(ValueError, match="cannot be met"):
        plan_memory(OLMOE, LENGTHS, options, MemoryBudget(host=10**9))


def test_impossible_budget_stops_before_any_work(setup: dict, tmp_path: Path) -> None:
    options = OPTIONS.model_copy(update={"max_memory": "100KB"})
    with pytest.raises(ValueError, match="--max-memory.*cannot be met"):
        Calibrator(str(setup["average"]), _domains(setup), options, tmp_path / "work")
    assert not (tmp_path / "work").exists()
