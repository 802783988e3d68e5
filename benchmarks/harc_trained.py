"""CG iterations and time per preconditioner on router inputs of a trained model (not synthetic).

Merges the given specialists (task arithmetic, lambda 1) into a temporary stage-1 model, walks it
with the calibration runner, captures the real router inputs of every MoE layer, and solves each
layer's router with every preconditioner at each gamma:

    python benchmarks/harc_trained.py --base B --source S1=FILE --source S2=FILE [--gamma 0.9 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from moemerge.calibrate.options import CalibrationOptions, RouterSolveOptions
from moemerge.calibrate.preconditioners import PRECONDITIONERS
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
    args = parser.parse_args()
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
        calibrator.run(progress=False, on_router_inputs=lambda i, xs: captured.__setitem__(i, xs))
        layout, reader = calibrator.layout, CheckpointReader(merged)
        sources = [CheckpointReader(p) for p, _ in pairs]
        print(
            f"{layout.family.model_type}: E={layout.moe_layers[0].num_experts}, d={captured[0][0].shape[1]}, "
            f"tokens per domain {[x.shape[0] for x in captured[layout.moe_layers[0].index]]}"
        )
        print(f"{'layer':>5} {'gamma':>5} | " + " | ".join(f"{p:>18}" for p in PRECONDITIONERS))
        for info in layout.moe_layers:
            for gamma in args.gamma:
                cells = []
                for name in PRECONDITIONERS:
                    start = time.perf_counter()
                    solution = solve_router(
                        [x.float() for x in captured[info.index]],
                        [s.read(info.router_weight).float() for s in sources],
                        reader.read(info.router_weight).float(),
                        kind=layout.router_kind.value,
                        options=RouterSolveOptions(gamma=gamma, preconditioner=name),
                    )
                    seconds = time.perf_counter() - start
                    mark = "" if solution.stats.converged else "!"
                    cells.append(f"{solution.stats.iterations:>4}{mark} it {seconds:6.2f} s")
                print(f"{info.index:>5} {gamma:>5} | " + " | ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
