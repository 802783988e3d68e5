"""Cost of routing-aware RegMean on one OLMoE-shaped MoE layer, next to HARC's router solve.

Random but shaped like the real problem: E experts (d -> I -> d, SwiGLU, OLMoE: E 64, d 2048,
I 1024, top-8), K sources whose experts and routers are fine-tunes of one base, N tokens per
source with anisotropic activations (as benchmarks/harc_cg.py). Each source routes its own tokens
with its own router, like the calibration walk. Timed separately, with the peak resident memory
each phase adds (sampled every 5 ms) next to the size of the float64 sums:

- Gram pass: every source folded into the running sums of all experts (gate/up and down),
  ``fold_expert_batch`` as the walk calls it, per-batch products in float32;
- solves: ``regmean_solve`` (batched Cholesky) for gate/up and down;
- HARC: ``solve_router`` on the same activations (default options: kronecker, gamma 0.9).

    python benchmarks/experts_cost.py [--E 64 --d 2048 --I 1024 --top-k 8 --tokens 2048 --sources 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from moemerge.calibrate.fused_experts import ExpertWeights
from moemerge.calibrate.options import RouterSolveOptions
from moemerge.calibrate.regmean_sums import RegMeanSums, fold_expert_batch, regmean_solve
from moemerge.calibrate.solve import solve_router


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak resident memory above the start of a `with` block, sampled in a thread."""

    def __init__(self) -> None:
        self.extra = 0

    def __enter__(self) -> Peak:
        self.start, self.peak, self.running = _rss(), _rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.seconds = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.seconds
        self.running = False
        self.thread.join()
        self.extra = max(self.peak, _rss()) - self.start


def make_layer(args: argparse.Namespace):
    g = torch.Generator().manual_seed(0)
    E, d, inter, K = args.E, args.d, args.I, args.sources
    scales = torch.logspace(0, -args.decades, d)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    xs = [(torch.randn(args.tokens, d, generator=g) + 0.5 * torch.randn(d, generator=g)) * scales @ rotation]
    for _ in range(K - 1):
        xs.append((torch.randn(args.tokens, d, generator=g) + 0.5 * torch.randn(d, generator=g)) * scales @ rotation)
    base_gu = torch.randn(E, 2 * inter, d, generator=g) / d**0.5
    base_down = torch.randn(E, d, inter, generator=g) / inter**0.5
    base_router = torch.randn(E, d, generator=g) * 1.5 / float(scales.square().sum().sqrt())
    act = torch.nn.functional.silu

    def gate(y: torch.Tensor) -> torch.Tensor:
        g_, u = y.chunk(2, dim=-1)
        return act(g_) * u

    sources, routers = [], []
    for _ in range(K):
        sources.append(
            ExpertWeights(
                base_gu + 0.05 * base_gu.std() * torch.randn(base_gu.shape, generator=g),
                base_down + 0.05 * base_down.std() * torch.randn(base_down.shape, generator=g),
                False,
                gate,
            )
        )
        routers.append(base_router + 0.3 * base_router.std() * torch.randn(E, d, generator=g))
    return xs, sources, routers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--E", type=int, default=64, help="experts")
    parser.add_argument("--d", type=int, default=2048, help="hidden size")
    parser.add_argument("--I", type=int, default=1024, help="expert intermediate size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per source")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024, help="tokens per folded batch")
    parser.add_argument("--decades", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    xs, sources, routers = make_layer(args)
    E, d, inter = args.E, args.d, args.I

    with Peak() as gram:
        gate_up = RegMeanSums.zeros(E, 2 * inter, d, args.alpha, "cpu")
        down = RegMeanSums.zeros(E, d, inter, args.alpha, "cpu")
        tokens = torch.zeros(len(sources), E, dtype=torch.float64)
        for k, (x, source, router) in enumerate(zip(xs, sources, routers, strict=True)):
            for start in range(0, x.shape[0], args.batch):
                xb = x[start : start + args.batch]
                probs = (xb @ router.T).softmax(-1)
                weights, index = probs.topk(args.top_k, dim=-1)
                fold_expert_batch(range(E), xb, index, weights, source, gate_up, down, tokens[k])
    sums_bytes = E * (RegMeanSums.bytes_per_map(2 * inter, d) + RegMeanSums.bytes_per_map(d, inter))

    with Peak() as solve:
        stage1 = [sum(s.gate_up for s in sources) / len(sources), sum(s.down for s in sources) / len(sources)]
        w_gu, fb_gu = regmean_solve(gate_up.rhs, gate_up.gram, args.alpha, stage1[0])
        w_down, fb_down = regmean_solve(down.rhs, down.gram, args.alpha, stage1[1])
    del gate_up, down, w_gu, w_down

    with Peak() as harc:
        merged = sum(routers) / len(routers)
        solution = solve_router(xs, routers, merged, kind="softmax", options=RouterSolveOptions())

    per_expert = tokens.sum(0)
    print(
        f"E {E}, d {d}, I {inter}, top-{args.top_k}, {args.sources} sources x {args.tokens} tokens, "
        f"torch threads {torch.get_num_threads()}; tokens per expert (all sources): min {int(per_expert.min())}, "
        f"median {int(per_expert.median())}, max {int(per_expert.max())}; fallbacks {int(fb_gu.sum() + fb_down.sum())}"
    )
    gib = 2**30
    print("| phase | seconds | peak extra memory (GiB) | note |")
    print("|---|---:|---:|---|")
    print(
        f"| Gram pass (fold {args.sources} sources) | {gram.seconds:.1f} | {gram.extra / gib:.2f} | "
        f"float64 sums {sums_bytes / gib:.2f} GiB |"
    )
    print(f"| RegMean solves (gate/up + down, Cholesky) | {solve.seconds:.1f} | {solve.extra / gib:.2f} | |")
    print(
        f"| HARC router solve ({solution.stats.preconditioner}) | {harc.seconds:.1f} | {harc.extra / gib:.2f} | "
        f"{solution.stats.iterations} CG iterations, residual {solution.stats.relative_residual:.1e} |"
    )


if __name__ == "__main__":
    main()
