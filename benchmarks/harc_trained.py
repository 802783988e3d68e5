"""Time to tolerance per preconditioner on router inputs of trained models (not synthetic), side by side.

Merges the given specialists (task arithmetic, lambda 1) into a temporary stage-1 model, walks it
with the calibration runner, captures the real router inputs of every MoE layer, and solves each
layer's router with every preconditioner at each gamma. Each solve is the whole `solve_router`
(statistics, right-hand side, preconditioner set-up and CG); the preconditioners are run
round-robin ``--repeats`` times and the ratio to ``diagonal`` (Jacobi) is the median of the
per-round ratios. Goal (issue 18): the default (``auto``) at most 1/4 of ``diagonal``.

    python benchmarks/harc_trained.py --base B --source S1=FILE --source S2=FILE [--gamma 0.9 1.0]
        [--preconditioners auto,diagonal,kronecker] [--repeats 5] [--threads 1]

With the shipped specialists: C=examples/specialists/checkpoints/olmoe (or glm4_moe, a sigmoid
router), D=examples/specialists/data, `--base $C/base --source $C/code=$D/code.jsonl
--source $C/prose=$D/prose.jsonl --source $C/math=$D/math.jsonl`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moemerge.calibrate.options import CalibrationOptions, RouterSolveOptions
from moemerge.calibrate.runner import Calibrator, Domain
from moemerge.calibrate.solve import solve_router
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.config import Recipe
from moemerge.pipeline.stage1 import merge_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--source", action="append", required=True, help="SOURCE_DIR=DATA_FILE")
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.9, 1.0])
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--preconditioners", default="auto,diagonal,kronecker,grouped,block,none")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the solves (default: torch's)")
    args = parser.parse_args()
    names = args.preconditioners.split(",")
    pairs = [s.split("=", 1) for s in args.source]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Recipe(
            merge_method="task_arithmetic",
            base_model=args.base,
            models=[{"model": p} for p, _ in pairs],
            dtype="float32",
        )
        merged = merge_checkpoints(recipe, Path(tmp) / "stage1", progress=False)
        options = CalibrationOptions(data={"max_samples": args.max_samples, "max_length": args.max_length})
        calibrator = Calibrator(str(merged), [Domain(p, (f,)) for p, f in pairs], options, Path(tmp) / "work")
        captured: dict[int, list[torch.Tensor]] = {}
        calibrator.run(progress=False, on_router_inputs=lambda i, xs: captured.__setitem__(i, [x.float() for x in xs]))
        layout, reader = calibrator.layout, CheckpointReader(merged)
        sources = [CheckpointReader(p) for p, _ in pairs]
        routers = {
            info.index: ([s.read(info.router_weight).float() for s in sources], reader.read(info.router_weight).float())
            for info in layout.moe_layers
        }
    if args.threads:
        torch.set_num_threads(args.threads)
    first = layout.moe_layers[0].index
    print(
        f"{layout.family.model_type} ({layout.router_kind.value} router): E={layout.moe_layers[0].num_experts}, "
        f"d={captured[first][0].shape[1]}, tokens per domain {[x.shape[0] for x in captured[first]]}, "
        f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved rounds; cells: iterations, "
        "median ms of the whole solve_router, / diagonal"
    )
    print(f"{'layer':>5} {'gamma':>5} | " + " | ".join(f"{p:>24}" for p in names))
    for info in layout.moe_layers:
        sources_w, merged_w = routers[info.index]
        for gamma in args.gamma:
            seconds: dict[str, list[float]] = {name: [] for name in names}
            stats = {}
            for _ in range(args.repeats):
                for name in names:
                    start = time.perf_counter()
                    solution = solve_router(
                        captured[info.index],
                        sources_w,
                        merged_w,
                        kind=layout.router_kind.value,
                        options=RouterSolveOptions(gamma=gamma, preconditioner=name),
                    )
                    seconds[name].append(time.perf_counter() - start)
                    stats[name] = solution.stats
            cells = []
            for name in names:
                ratio = (
                    statistics.median(t / d for t, d in zip(seconds[name], seconds["diagonal"], strict=True))
                    if "diagonal" in seconds
                    else float("nan")
                )
                mark = "" if stats[name].converged else "!"
                ms = statistics.median(seconds[name]) * 1e3
                cells.append(f"{stats[name].iterations:>4}{mark} it {ms:6.1f} ms {ratio:5.2f}")
            print(f"{info.index:>5} {gamma:>5} | " + " | ".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
