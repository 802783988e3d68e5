"""The memory planner counts routing-aware RegMean of the experts (``experts: true``) and fits its groups to a budget.

The terms are those of moemerge/calibrate/memory.py's docstring; here they are computed by hand for
a small shape, and the planned groups are run on a tiny OLMoE: more, smaller groups give the same
model bit for bit, and a budget too small for one expert stops the run before any work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_specialists

import moemerge.calibrate.runner as runner
from moemerge.architectures.layout import load_layout
from moemerge.architectures.tiny import save_tiny_model
from moemerge.calibrate.memory import (
    MemoryBudget,
    MemoryPlanError,
    ModelShape,
    expert_sums_bytes,
    group_bytes,
    plan_memory,
    rank_tokens,
)
from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.runner import Calibrator, Domain, calibrate
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.data import DataOptions, load_domain

d, E, I = 64, 8, 32  # noqa: E741 (the expert width, as in the docs)
A, C = 2 * I * d, d * I  # numbers of one expert's gate/up and down
SHAPE = ModelShape(
    hidden=d,
    experts=E,
    top_k=2,
    heads=4,
    expert_width=I,
    layer_numbers=E * (A + C) + 4 * d * d,  # experts and attention
    resident_numbers=10_000,
    layer_disk_bytes=2 * (E * (A + C) + 4 * d * d),  # bfloat16 on disk
    expert_maps=((2 * I, d), (d, I)),
)
LENGTHS = [[32] * 8, [16] * 8]  # one batch of 8 x 32 and one of 8 x 16 tokens
SMALL = dict(batch_tokens=256, data=DataOptions(max_length=40))


def test_experts_add_the_regmean_terms_to_the_plan() -> None:
    """Classic RegMean, one group of all 8 experts, everything float32: the peak is a source's pass."""
    f = s = w = 4
    tokens = rank_tokens(LENGTHS, 256, 1)
    T, t_max, N, n_max = sum(tokens.padded), max(tokens.padded), sum(tokens.real), max(tokens.real)
    assert (T, t_max, N, n_max) == (384, 256, 384, 256)
    resident, layer = SHAPE.resident_numbers * f, SHAPE.layer_numbers * f
    batch = 256 * (20 * d + 2 * 4 * 32 + 4 * 2 * I + 4 * E) * f
    forward = resident + layer + batch + (T + t_max) * d * s + (N + n_max) * d * s  # HARC's largest phase
    harc = plan_memory(SHAPE, LENGTHS, CalibrationOptions(**SMALL), MemoryBudget())
    assert harc.host_bytes == forward

    sums_a, sums_c = 8 * (A + d * d), 8 * (C + I * I)  # float64 running sums of one expert's gate/up and down
    fold = (256 * (4 * d + 6 * I) + d * d + 2 * A) * w  # one batch's expert inputs, gate/up's products
    casts = (2 * A + C) * w  # the source's expert and (sequential) the merged model's gate/up, in the work dtype
    # a source's pass holds, beside HARC's forward minus its router inputs and the merged model's new outputs:
    regmean = (
        layer  # the source's layer
        + (T + t_max) * d * s  # the sources' hidden states, one domain's new ones
        + E * (sums_a + sums_c)  # the sums of the group
        + fold
        + casts
    )
    options = CalibrationOptions(experts=True, regmean={"variant": "classic"}, **SMALL)
    plan = plan_memory(SHAPE, LENGTHS, options, MemoryBudget())
    assert plan.host_bytes - harc.host_bytes == regmean - (N + n_max) * d * s - t_max * d * s
    parts = {what: n for what, n, _ in plan.parts}
    solved = 8 * E * A + E * A * f  # one map's solution (float64) next to its stage-1 slice; the other's is banked
    assert parts["RegMean: sums and solutions, groups of 8"] == E * (sums_a + sums_c) + solved
    assert parts["one source's decoder layer (read, converted)"] == 3 * layer + SHAPE.layer_disk_bytes
    assert plan.expert_group == E and plan.apply(options) == options and not plan.changes

    # experts in a bank (bfloat16 on disk): the merged layer holds them once in bfloat16, a source none
    banked = dataclasses.replace(SHAPE, banked=True, expert_disk_bytes=2 * E * (A + C))
    rest = 4 * d * d * f  # the attention, converted
    cast = E * (A + C) * (f + 2)  # a group of experts (all 8 fit in 256 MB) read (bfloat16) and cast for the forward
    harc_banked = plan_memory(banked, LENGTHS, CalibrationOptions(**SMALL), MemoryBudget())
    assert harc_banked.host_bytes == forward - layer + rest + 2 * E * (A + C) + cast
    plan = plan_memory(banked, LENGTHS, options, MemoryBudget())
    parts = {what: n for what, n, _ in plan.parts}
    assert parts["its experts in a bank (storage dtype)"] == 2 * E * (A + C)
    assert parts["one source's decoder layer (read, converted)"] == 3 * rest + 2 * 4 * d * d
    assert parts["RegMean: sums and solutions, groups of 8"] == E * (sums_a + sums_c) + 8 * E * A + E * A * 2
    # each map's solution goes to a group file as it is solved (within the solve's term): no layer of new experts;
    # on a GPU the group's solution is copied to the host as on-disk tensors and serialised there
    assert not [what for what in parts if "new experts" in what]
    on_gpu = plan_memory(banked, LENGTHS, options, MemoryBudget(), on_gpu=True)
    assert ("RegMean: a group's new experts, written", 2 * E * A * 2, "host") in on_gpu.parts
    assert "RegMean: new experts as saved, and converted" in {
        w for w, _, _ in plan_memory(SHAPE, LENGTHS, options, MemoryBudget()).parts
    }
    assert plan.host_bytes - harc_banked.host_bytes == (
        rest
        + (T + t_max) * d * s
        + E * (sums_a + sums_c)
        + fold
        + casts
        + (A + C) * 2
        - (N + n_max) * d * s
        - t_max * d * s
    )

    # sequential, two groups of 4: a task holds one projection's sums, and nothing of the task before it
    assert sums_a > sums_c and A > C
    assert group_bytes(SHAPE, 4, "sequential", f) == {
        "load": 4 * sums_a,
        "pass": 4 * sums_a,
        "regmean": 4 * sums_a + 4 * A * (8 + f),
        "output": 0,
    }


def test_model_shape_reads_the_experts_from_the_model(tiny_olmoe: Path, tmp_path: Path) -> None:
    shape = ModelShape.of(load_layout(tiny_olmoe), CheckpointReader(tiny_olmoe))
    assert shape.expert_maps == ((96, 32), (32, 48)) and not shape.expert_bias  # 2I x d, d x I
    assert sorted(shape.linear_maps) == [(16, 32), (16, 32), (32, 32), (32, 32)]  # q, k, v, o; not the router
    assert shape.layer_disk_bytes == 4 * shape.layer_numbers  # saved in float32
    gpt_oss = save_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    shape = ModelShape.of(load_layout(gpt_oss), CheckpointReader(gpt_oss))
    assert shape.expert_maps == ((96, 33), (32, 49)) and shape.expert_bias  # [W | b]
    assert (32, 33) in shape.linear_maps  # q_proj with its bias


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_specialists("olmoe", tmp_path_factory.mktemp("memory_experts"))


def _domains(setup: dict) -> list[Domain]:
    return [Domain(str(s), (str(f),)) for s, f in zip(setup["sources"], setup["data"], strict=True)]


def _shape_and_lengths(setup: dict, options: CalibrationOptions) -> tuple[ModelShape, list[list[int]]]:
    """What the Calibrator plans from: the model's shape and every calibration sample's length."""
    from transformers import AutoTokenizer

    merged = str(setup["average"])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    domains = [load_domain(d.source, d.files, tokenizer, options.data)[0] for d in _domains(setup)]
    lengths = [[len(sample) for sample in domain.samples] for domain in domains]
    return ModelShape.of(load_layout(merged), CheckpointReader(merged)), lengths


def test_short_budget_lowers_the_sums_budget_and_keeps_the_result(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget that HARC meets but RegMean's default single group does not: smaller groups, same model."""
    # budgets to the byte: the process's own memory, which moves as the test runs, is left out here
    # (test_memory_budget.py checks that the walk plans it as measured)
    monkeypatch.setattr(runner, "process_held_bytes", lambda: 0)
    options = CalibrationOptions(experts=True, **SMALL | {"batch_tokens": 64})  # the smallest batch already
    shape, lengths = _shape_and_lengths(setup, options)
    unit = expert_sums_bytes(shape)

    def sums_budget(n: int | None) -> CalibrationOptions:
        return options.model_copy(update={"regmean": options.regmean.model_copy(update={"sums_budget_bytes": n})})

    # groups of 2 with the merged experts read from disk: the planner tries one group of 4 held, then read from
    # disk (neither fits), then groups of 2 held, then read from disk
    held_in_twos = plan_memory(shape, lengths, sums_budget(2 * unit), MemoryBudget()).host_bytes
    budget = MemoryBudget(
        host=plan_memory(shape, lengths, sums_budget(2 * unit), MemoryBudget(host=held_in_twos - 1)).host_bytes
    )
    one_group = plan_memory(shape, lengths, options, MemoryBudget())
    assert (one_group.expert_group, one_group.merged_bank) == (4, "resident") and one_group.host_bytes > budget.host
    harc = options.model_copy(update={"experts": False})
    assert plan_memory(shape, lengths, harc, budget).changes == ()  # HARC alone fits as asked

    plan = plan_memory(shape, lengths, options, budget)
    assert (plan.expert_group, plan.sums_budget_bytes, plan.host_bytes) == (2, 2 * unit, budget.host)
    assert plan.merged_bank == "lazy"
    assert plan.changes == (
        "the merged model's experts read from disk when used, not held (slower, same result)",
        f"regmean sums_budget_bytes {2**33} -> {2 * unit} (experts in groups of 2)",
    )
    assert f"RegMean sums_budget_bytes {2 * unit} (experts in groups of 2)" in plan.describe()
    assert plan.apply(options) == sums_budget(2 * unit)

    limited = options.model_copy(update={"max_memory": budget.host})
    out = calibrate(str(setup["average"]), _domains(setup), tmp_path / "limited", limited, progress=False)
    reference = Calibrator(str(setup["average"]), _domains(setup), sums_budget(None), tmp_path / "reference.work")
    reference.run(progress=False)
    assert all(s["regmean"]["experts"]["passes"] == 2 for s in reference.summaries)  # gate/up, down: one group
    ref = reference.write(tmp_path / "reference", overwrite=False)
    a, b = CheckpointReader(out), CheckpointReader(ref)
    for name in b.names():
        assert torch.equal(a.read(name), b.read(name)), name
    report = json.loads((out / "moemerge_calibration.json").read_text())
    assert report["options"]["regmean"]["sums_budget_bytes"] == 2 * unit
    assert all(s["regmean"]["experts"]["passes"] == 4 for s in report["layers"])  # two groups x two projections
    memory = report["memory"]  # the plan beside what each stage held (the whole test process here: no bound)
    assert memory["planned_peak_host_gb"] == round(budget.host / 1e9, 3) and memory["planned_peak_device_gb"] is None
    assert "memory plan per rank" in memory["plan"][0]
    stage_peaks = [v["peak_rss_anon_gb"] for s in report["layers"] for v in s["stages"].values()]
    assert len(stage_peaks) >= 8 and memory["measured_peak_rss_anon_gb"] >= max(stage_peaks) > 0


def test_budget_below_one_expert_stops_before_any_work(setup: dict, tmp_path: Path) -> None:
    """HARC alone would fit; RegMean does not, even with the merged experts read from disk, one expert at a time,
    in bfloat16, without a preconditioner (the smallest plan, the planner's last)."""
    options = CalibrationOptions(experts=True, **SMALL | {"batch_tokens": 64})
    shape, lengths = _shape_and_lengths(setup, options)
    assert shape.banked
    with pytest.raises(MemoryPlanError) as refused:
        plan_memory(shape, lengths, options, MemoryBudget(host=1))
    smallest = refused.value.plan
    assert (smallest.merged_bank, smallest.expert_group, smallest.activation_dtype) == ("lazy", 1, "bfloat16")
    assert smallest.preconditioner == "none"
    budget = smallest.host_bytes - 1
    assert plan_memory(shape, lengths, options.model_copy(update={"experts": False}), MemoryBudget(host=budget))
    with pytest.raises(ValueError, match="cannot be met.*RegMean experts in groups of 1"):
        plan_memory(shape, lengths, options, MemoryBudget(host=budget))
    just = plan_memory(shape, lengths, options, MemoryBudget(host=budget + 1))  # a byte more: it runs that way
    assert (just.merged_bank, just.expert_group, just.activation_dtype) == ("lazy", 1, "bfloat16")
    with pytest.raises(ValueError, match="--max-memory.*cannot be met"):
        Calibrator(
            str(setup["average"]), _domains(setup), options.model_copy(update={"max_memory": budget}), tmp_path / "w"
        )
    assert not (tmp_path / "w").exists()
