"""Seconds spent in each stage of each layer of the walk, reported in the calibration summary.

A layer's time goes to reading its weights, the forward passes of the merged model and of the sources,
RegMean's sums and solves, the router solve and writing. Stages nest (a fold hook runs inside a
source's forward pass): each stage is charged its own time only, so the stages of a layer add up to
its total. Wall time is what a user waits; CPU time (all threads of the process) is what the
arithmetic took, and is the steadier of the two on a shared machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Self time (wall, CPU) per (layer, stage); ``layer`` is the layer being walked (set by the walk)."""

    def __init__(self) -> None:
        self.layer = -1
        self.layers: dict[int, dict[str, list[float]]] = {}
        self._children: list[list[float]] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        self._children.append([0.0, 0.0])
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            nested = self._children.pop()
            total = self.layers.setdefault(self.layer, {}).setdefault(stage, [0.0, 0.0])
            total[0] += wall - nested[0]
            total[1] += cpu - nested[1]
            if self._children:
                self._children[-1][0] += wall
                self._children[-1][1] += cpu

    def of(self, layer: int) -> dict[str, dict[str, float]]:
        """{stage: {"seconds", "cpu_seconds"}} of one layer, in the order the stages first ran."""
        return {
            stage: {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)}
            for stage, (wall, cpu) in self.layers.get(layer, {}).items()
        }
