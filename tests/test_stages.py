"""Stage times of the walk: nested stages are charged their own time only, so a layer's stages add up; each
stage keeps the peak memory the process held while it ran."""

from __future__ import annotations

import sys
import time

import pytest
import torch

import moemerge.calibrate.stages as stages
from moemerge.calibrate.memory import process_held_bytes
from moemerge.calibrate.stages import StageClock

needs_proc = pytest.mark.skipif(sys.platform != "linux", reason="reads RssAnon from /proc")


def test_nested_stages_are_charged_their_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"wall": 0.0, "cpu": 0.0}

    def advance(wall: float, cpu: float) -> None:
        now["wall"] += wall
        now["cpu"] += cpu

    monkeypatch.setattr(stages.time, "perf_counter", lambda: now["wall"])
    monkeypatch.setattr(stages.time, "process_time", lambda: now["cpu"])
    clock = StageClock()
    clock.layer = 2
    with clock("forward sources"):
        advance(1.0, 2.0)
        for _ in range(3):  # a fold hook inside the forward, once per batch
            with clock("expert sums"):
                advance(0.5, 1.0)
        advance(0.25, 0.5)
    clock.layer = 3
    with clock("forward sources"):
        advance(4.0, 4.0)

    def seconds(layer: int) -> dict:
        return {stage: {k: v for k, v in values.items() if "seconds" in k} for stage, values in clock.of(layer).items()}

    assert seconds(2) == {
        "forward sources": {"seconds": 1.25, "cpu_seconds": 2.5},
        "expert sums": {"seconds": 1.5, "cpu_seconds": 3.0},
    }
    assert seconds(3) == {"forward sources": {"seconds": 4.0, "cpu_seconds": 4.0}}
    assert clock.of(7) == {}


MB400 = 100_000_000  # float32 numbers


@needs_proc
def test_a_stage_keeps_the_peak_memory_it_held() -> None:
    """Read when a stage starts and ends: memory a stage still holds at its end is its peak, not the next one's."""
    clock = StageClock(sample_seconds=None)
    clock.layer = 0
    before = process_held_bytes()
    with clock("read merged layer"):
        block = torch.ones(MB400)  # written, so resident
    del block
    with clock("router solve"):
        pass
    peaks = {stage: values["peak_rss_anon_gb"] * 1e9 for stage, values in clock.of(0).items()}
    assert peaks["read merged layer"] >= before + 0.95 * 4 * MB400
    assert peaks["router solve"] <= peaks["read merged layer"] - 0.9 * 4 * MB400
    assert clock.peak() == clock.peaks[0]["read merged layer"]


@needs_proc
def test_the_background_reading_sees_what_a_stage_frees_before_it_ends() -> None:
    """A stage's transient (allocated and freed inside it, never there at its start or end) is caught by the
    thread that reads the memory while it runs, and charged to the innermost stage."""
    clock = StageClock(sample_seconds=0.005)
    clock.layer = 1
    before = process_held_bytes()
    with clock("forward sources"), clock("expert sums"):
        block = torch.ones(MB400)
        time.sleep(0.3)
        del block
    peaks = clock.peaks[1]
    assert peaks["expert sums"] >= before + 0.95 * 4 * MB400
    assert peaks["forward sources"] < peaks["expert sums"] - 0.9 * 4 * MB400
