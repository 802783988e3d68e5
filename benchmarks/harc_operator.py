"""Throughput of the HARC operator A_i(V) next to plain torch matmuls of the same FLOPs.

One application over N tokens costs 4 N E d flops (Z = V X^T and HZ X). Two references are
timed in the same run: the same two matmuls on the same shapes with nothing around them (the
ceiling for this formulation), and one square matmul of the same FLOPs (the machine's peak).
Goal (issue 18): the operator reaches >= 85% of the same-shapes matmuls at the OLMoE (E 64) and
Qwen3-30B-A3B (E 128) router shapes, d 2048.

    python benchmarks/harc_operator.py [--tokens 32768 --E 64 --d 2048 --batch-sizes 1024,4096,16384]
    python benchmarks/harc_operator.py --E 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from moemerge.calibrate.operator import DomainCurvature


def timed(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall seconds of each of ``fns``, run interleaved (so a machine shared with other jobs
    slows them alike) after one warm-up call each."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(repeats + 1):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if rep:
                ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--E", type=int, default=64)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--batch-sizes", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    n, E, d, device = args.tokens, args.E, args.d, args.device
    flops = 4 * n * E * d
    X32 = torch.randn(n, d, device=device)
    W = torch.randn(E, d, device=device) / d**0.5
    V = torch.randn(E, d, device=device)

    side = round((flops / 2) ** (1 / 3))
    A, B = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"HARC operator, N={n} tokens, E={E}, d={d}, {flops / 1e9:.1f} GFLOP per application, "
        f"device={device}, torch threads={torch.get_num_threads()}, load average at start {load:.1f}"
    )
    print()
    header = (
        f"{'storage':>8} {'batch':>6} | {'operator':>9} {'same matmuls':>12} {'square':>7} | "
        f"{'op/matmuls':>10} {'op/square':>9}"
    )
    print(header)
    print("-" * len(header))
    for storage in (torch.float32, torch.bfloat16):
        X = X32.to(storage)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            domain = DomainCurvature(X, W, batch_size=batch)

            def bare(batch: int = batch, X: torch.Tensor = X) -> None:
                out = torch.zeros(E, d, dtype=torch.float64, device=device)
                for s in range(0, n, batch):
                    xb = X[s : s + batch].float()
                    z = V @ xb.T
                    out += (z @ xb).double()

            seconds = timed([lambda domain=domain: domain.apply(V), bare, lambda: A @ B], args.repeats)
            op, mm, square = (flops / s / 1e9 for s in seconds)
            name = str(storage).removeprefix("torch.")
            print(
                f"{name:>8} {batch:>6} | {op:>9.1f} {mm:>12.1f} {square:>7.1f} | {op / mm:>10.0%} {op / square:>9.0%}"
            )
    print(
        f"\n(GFLOP/s; 'same matmuls' = V X^T and Z X on the same batches, cast and float64 sum included; "
        f"'square' = one {side}^3 matmul of the same FLOPs; all three timed interleaved, median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
