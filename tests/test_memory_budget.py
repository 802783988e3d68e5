"""The default memory budget (what the host has available now) and ``--max-memory`` on ``merge`` and ``run``.

A run without ``--max-memory`` plans against 90 % of MemAvailable (capped by the cgroup's room): it adapts
to it or stops, with the plan, before any work. The flag reaches the walk of stage-1 ``regmean`` and of
``run`` from the command line, overriding the recipe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_specialists
from safetensors import safe_open

import moemerge.calibrate.memory as memory
import moemerge.calibrate.runner as runner
from moemerge.architectures.layout import load_layout
from moemerge.architectures.tiny import save_tiny_model
from moemerge.calibrate.fused_experts import bank_of, experts_module
from moemerge.calibrate.memory import (
    AVAILABLE_SHARE,
    MemoryBudget,
    ModelShape,
    host_available,
    parse_budget,
    plan_memory,
    process_held_bytes,
    solver_bytes,
)
from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.preconditioners import required_bytes, resolve_auto
from moemerge.calibrate.runner import Calibrator, Domain, plan_calibration
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.cli import main


def _meminfo_available() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def test_default_budget_is_a_share_of_the_memory_available_now() -> None:
    available = _meminfo_available()
    assert 0 < host_available() <= available * 1.1  # MemAvailable moves while other processes run
    budget = parse_budget(None, "cpu")
    assert budget.origin.startswith("available memory") and budget.device is None
    assert 0.5 * AVAILABLE_SHARE * available < budget.host <= 1.1 * AVAILABLE_SHARE * available
    assert parse_budget("unlimited", "cpu") == MemoryBudget(origin="--max-memory unlimited")
    assert parse_budget("16GB", "cpu") == MemoryBudget(host=16 * 10**9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_specialists("olmoe", tmp_path_factory.mktemp("budget"), num_hidden_layers=2)


def _domains(setup: dict) -> list[Domain]:
    return [Domain(str(s), (str(f),)) for s, f in zip(setup["sources"], setup["data"], strict=True)]


def test_default_budget_that_cannot_be_met_stops_with_the_plan(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --max-memory the plan must fit what is available; the refusal names that budget and prints the plan."""
    options = CalibrationOptions(experts=True, batch_tokens=256)
    fits = Calibrator(str(setup["average"]), _domains(setup), options, tmp_path / "fits")
    assert fits.plan.budget.origin.startswith("available memory") and not fits.plan.changes
    assert "budget from available memory" in fits.plan.describe()
    monkeypatch.setattr(memory, "AVAILABLE_SHARE", 1e3 / _meminfo_available())  # ~1 kB "available"
    with pytest.raises(ValueError, match=r"the budget from available memory.*cannot be met.*\n.*memory plan per rank"):
        Calibrator(str(setup["average"]), _domains(setup), options, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def _regmean_recipe(setup: dict, tmp_path: Path, method: str) -> Path:
    sources = [str(s) for s in setup["sources"]]
    recipe = {
        "merge_method": method,
        "base_model": str(setup["base"]),
        "models": [{"model": s} for s in sources],
        "dtype": "float32",
        "calibrate": {
            "domains": {s: [str(f)] for s, f in zip(sources, setup["data"], strict=True)},
            "batch_tokens": 256,
            "data": {"max_length": 64, "heldout": 0},
        },
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("command", ["merge", "run"])
def test_max_memory_flag_reaches_the_walk(
    setup: dict, tmp_path: Path, command: str, capsys: pytest.CaptureFixture
) -> None:
    """`merge` (stage-1 regmean's walk) and `run` (stage 2) plan to --max-memory, over the recipe's (none here)."""
    recipe = _regmean_recipe(setup, tmp_path, "regmean" if command == "merge" else "linear")
    out = tmp_path / "out"
    assert main([command, str(recipe), "-o", str(out), "--max-memory", "1MB"]) == 1
    err = capsys.readouterr().err
    assert "moemerge: error: --max-memory: the budget (host 0.001 GB, device no limit per rank) cannot be met" in err
    assert "memory plan per rank" in err and "budget from --max-memory" in err  # the smallest plan, printed
    assert not out.exists()
    # `run` plans stage 2 from the tensors stage 1 would write, and refuses before merging anything
    assert sorted(p.name for p in tmp_path.iterdir()) == [recipe.name]


def test_plan_before_stage_1_equals_the_plan_of_its_output(setup: dict, tmp_path: Path) -> None:
    """Planned from the base model as stage 1 will write it (bfloat16 from a float32 base), the shape and the plan
    are those of the stage-1 output itself, so `run` refuses before stage 1 exactly what the walk would refuse."""
    recipe = _regmean_recipe(setup, tmp_path, "task_arithmetic")
    text = yaml.safe_load(recipe.read_text()) | {"dtype": "bfloat16"}
    recipe.write_text(yaml.safe_dump(text))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "stage1"), "--quiet"]) == 0
    stage1, base = str(tmp_path / "stage1"), str(setup["base"])
    assert CheckpointReader(base).info(next(iter(CheckpointReader(base).names()))).dtype == "F32"
    planned = ModelShape.of(load_layout(base), CheckpointReader(base), stored_as="bfloat16")
    assert planned == ModelShape.of(load_layout(stage1), CheckpointReader(stage1))
    assert planned != ModelShape.of(load_layout(base), CheckpointReader(base))
    options = CalibrationOptions(experts=True, batch_tokens=256, max_memory="unlimited")
    before = plan_calibration(base, _domains(setup), options, stored_as="bfloat16")
    assert before.describe() == Calibrator(stage1, _domains(setup), options, tmp_path / "work").plan.describe()


@pytest.mark.parametrize("family", ["olmoe", "glm4_moe"])
def test_plan_counts_the_preconditioner_auto_picks_for_the_router_kind(family: str, tmp_path: Path) -> None:
    """A narrow softmax router's ``auto`` is ``grouped``, a sigmoid router's ``kronecker``: the plan's solver term
    is that one's memory, as the solve will use it."""
    path = save_tiny_model(family, tmp_path / family, num_hidden_layers=2)
    shape = ModelShape.of(load_layout(path), CheckpointReader(path))
    assert shape.router_kind == ("sigmoid" if family == "glm4_moe" else "softmax")
    options = CalibrationOptions(max_memory="unlimited")
    lengths = [[32] * 4, [32] * 3]
    plan = plan_memory(shape, lengths, options, parse_budget("unlimited", "cpu"))
    dim, tokens = shape.hidden + 1, sum(map(sum, lengths))
    picked = resolve_auto("auto", shape.experts, dim, shape.router_kind)
    assert picked == ("kronecker" if family == "glm4_moe" else "grouped")
    solver = dict((what, size) for what, size, _ in plan.parts)["solver (auto)"]
    assert solver == solver_bytes(tokens, shape.experts, dim, 2, options.harc, "auto", shape.router_kind)
    assert required_bytes("auto", shape.experts, dim, torch.float32, shape.router_kind) == required_bytes(
        picked, shape.experts, dim, torch.float32
    )


@pytest.mark.parametrize("experts", [False, True], ids=["harc", "harc+regmean"])
def test_budget_below_the_bank_reads_the_experts_from_disk(
    experts: bool, setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget that no plan holding the merged model's experts meets: the planner reads them from disk when used
    (a lazy bank) instead of refusing, and the calibrated model is bit-identical to the one computed with the
    experts held, at the same settings. With RegMean the new experts go to group files, which the lazy bank
    reads back and the output is written from; no layer file holds them."""
    monkeypatch.setattr(runner, "process_held_bytes", lambda: 0)  # a budget to the byte, without the process's own
    merged, domains = str(setup["average"]), _domains(setup)
    options = CalibrationOptions(batch_tokens=256, max_memory="unlimited", experts=experts)
    held = Calibrator(merged, domains, options, tmp_path / "held.work")
    assert held.plan.merged_bank == "resident"
    shape = ModelShape.of(held.layout, CheckpointReader(merged))
    assert shape.banked and shape.expert_disk_bytes > 0
    lengths = [[int(n) for b in d.batches for n in b.attention_mask.sum(1)] for d in held.domains]
    assert max(map(max, lengths)) > options.batch_tokens // 2  # no smaller batch to fall back to
    harc = options.harc.model_copy(update={"preconditioner": "none"})
    one = options.regmean.model_copy(update={"sums_budget_bytes": memory.expert_sums_bytes(shape)})
    smallest = options.model_copy(update={"harc": harc, "regmean": one})
    unlimited = parse_budget("unlimited", "cpu")
    least_held = plan_memory(shape, lengths, smallest, unlimited).host_bytes  # the smallest plan holding them
    lazy = Calibrator(merged, domains, options.model_copy(update={"max_memory": least_held - 1}), tmp_path / "w")
    assert lazy.plan.merged_bank == "lazy" and lazy.plan.activation_dtype == "float32"
    assert lazy.plan.host_bytes <= least_held - 1 and "read from disk when used" in lazy.plan.describe()
    bank = bank_of(experts_module(lazy.walker.materialize(1), "merged")[1])
    assert bank is not None and not bank.resident
    lazy.walker.release(1)
    same = lazy.plan.apply(options)  # the same batch, preconditioner and RegMean groups, experts held
    reference = Calibrator(merged, domains, same, tmp_path / "ref.work")
    assert reference.plan.merged_bank == "resident"
    for calibrator, out in ((lazy, tmp_path / "lazy"), (reference, tmp_path / "ref")):
        calibrator.run(progress=False)
        calibrator.write(out, overwrite=False)
    got, want = CheckpointReader(tmp_path / "lazy"), CheckpointReader(tmp_path / "ref")
    assert got.names() == want.names()
    assert all(torch.equal(got.read(n), want.read(n)) for n in want.names())
    if experts:
        stage1 = CheckpointReader(merged)
        changed = {n for n in want.names() if ".experts." in n and not torch.equal(want.read(n), stage1.read(n))}
        assert changed and changed == set(lazy.regmean.replaced)
        groups = list((tmp_path / "w").glob("layer_*.regmean.experts.*.safetensors"))
        in_groups: set[str] = set()
        for group in groups:
            with safe_open(str(group), framework="pt") as handle:
                in_groups |= set(handle.keys())
        assert changed <= in_groups
        for layer in (tmp_path / "w").glob("layer_*.regmean.safetensors"):
            with safe_open(str(layer), framework="pt") as handle:
                assert not [n for n in handle.keys() if ".experts." in n], layer


def test_plan_counts_what_the_process_holds(setup: dict, tmp_path: Path) -> None:
    """The walk's plan starts from the anonymous memory the process holds when it plans (interpreter, libraries,
    tokenised text), read from /proc, since a budget bounds the whole process."""
    before = process_held_bytes()
    plan = Calibrator(str(setup["average"]), _domains(setup), CalibrationOptions(), tmp_path / "w").plan
    held = dict((what, size) for what, size, _ in plan.parts)["this process before the walk (libraries, text)"]
    assert 0.9 * before <= held <= process_held_bytes() * 1.1 and held > 50e6  # torch alone holds more
    assert plan.host_bytes >= held + sum(size for what, size, where in plan.parts if what.startswith("hidden"))
