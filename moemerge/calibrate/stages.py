"""Seconds and peak memory of each stage of each layer of the walk, reported in the calibration summary.

A layer's time goes to reading its weights, the forward passes of the merged model and of the sources,
RegMean's sums and solves, the router solve and writing. Stages nest (a fold hook runs inside a
source's forward pass): each stage is charged its own time only, so the stages of a layer add up to
its total. Wall time is what a user waits; CPU time (all threads of the process) is what the
arithmetic took, and is the steadier of the two on a shared machine.

Memory: the process's anonymous resident memory (RssAnon, what the memory plan bounds: tensors, the
interpreter; not the memory-mapped checkpoints) is read when a stage starts and ends and every 20 ms in
between by a background thread, and each stage keeps the largest value seen while it was the innermost
one. The summary's per-stage peaks are so set beside the plan's peak (``--max-memory``) without an
outside tool. Where /proc cannot tell (not Linux) no peaks are reported.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from moemerge.calibrate.memory import process_held_bytes

SAMPLE_SECONDS = 0.02
"""How often the background thread reads the process's memory while a stage runs."""


class StageClock:
    """Self time (wall, CPU) and peak RssAnon per (layer, stage); ``layer`` is the layer being walked (set by the
    walk)."""

    def __init__(self, sample_seconds: float | None = SAMPLE_SECONDS) -> None:
        self.layer = -1
        self.layers: dict[int, dict[str, list[float]]] = {}
        self.peaks: dict[int, dict[str, int]] = {}
        self._children: list[list[float]] = []
        self._stages: list[str] = []
        self._lock = threading.Lock()
        self._measures = process_held_bytes() > 0
        if self._measures and sample_seconds:
            watcher = threading.Thread(
                target=_watch, args=(weakref.ref(self), sample_seconds), name="moemerge-stage-memory", daemon=True
            )
            watcher.start()

    def sample(self) -> None:
        """Charge the memory held now to the innermost stage running (nothing outside a stage)."""
        if not self._measures:
            return
        held = process_held_bytes()
        with self._lock:
            if self._stages:
                stages = self.peaks.setdefault(self.layer, {})
                stage = self._stages[-1]
                stages[stage] = max(stages.get(stage, 0), held)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        self._children.append([0.0, 0.0])
        with self._lock:
            self._stages.append(stage)
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self._stages.pop()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            nested = self._children.pop()
            total = self.layers.setdefault(self.layer, {}).setdefault(stage, [0.0, 0.0])
            total[0] += wall - nested[0]
            total[1] += cpu - nested[1]
            if self._children:
                self._children[-1][0] += wall
                self._children[-1][1] += cpu

    def of(self, layer: int) -> dict[str, dict[str, float]]:
        """{stage: {"seconds", "cpu_seconds", "peak_rss_anon_gb"}} of one layer, in the order the stages first ran."""
        peaks = self.peaks.get(layer, {})
        return {
            stage: {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3)}
            | ({"peak_rss_anon_gb": round(peaks[stage] / 1e9, 3)} if stage in peaks else {})
            for stage, (wall, cpu) in self.layers.get(layer, {}).items()
        }

    def peak(self) -> int | None:
        """The largest memory any stage of any layer held (bytes), None where it cannot be measured."""
        values = [held for stages in self.peaks.values() for held in stages.values()]
        return max(values) if values else None


def _watch(clock: weakref.ref[StageClock], seconds: float) -> None:
    """Sample the clock's memory every `seconds` for as long as the clock exists."""
    while True:
        current = clock()
        if current is None:
            return
        current.sample()
        del current
        time.sleep(seconds)
