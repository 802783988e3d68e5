"""Stage times of the walk: nested stages are charged their own time only, so a layer's stages add up."""

from __future__ import annotations

import pytest

import moemerge.calibrate.stages as stages
from moemerge.calibrate.stages import StageClock


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
    assert clock.of(2) == {
        "forward sources": {"seconds": 1.25, "cpu_seconds": 2.5},
        "expert sums": {"seconds": 1.5, "cpu_seconds": 3.0},
    }
    assert clock.of(3) == {"forward sources": {"seconds": 4.0, "cpu_seconds": 4.0}}
    assert clock.of(7) == {}
