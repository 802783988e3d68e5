"""CG iterations and time to tol for each preconditioner, on OLMoE-sized router shapes.

Synthetic but shaped like the real problem: E = 64 experts, d = 2048, K source domains whose
activations are anisotropic (X = G diag(logspace(0, -decades)) Q with Q a random rotation, plus a
per-domain mean), source routers that are fine-tunes of one base router (logit std ~1.5) and a
stage-1 merge near their average. Setup (curvature statistics, right-hand side, preconditioner)
and CG are timed separately; "passes" expresses both in operator applications over all tokens,
which carries over to other token counts and hardware (setup and per-iteration cost both scale
with N). Goal: block needs >= 5x fewer iterations than none.

    python benchmarks/harc_cg.py [--tokens 4096 --domains 3 --E 64 --d 2048 --gamma 0.9]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from moemerge.calibrate.cg import conjugate_gradient
from moemerge.calibrate.operator import DomainCurvature, HarcSystem
from moemerge.calibrate.preconditioners import PRECONDITIONERS, build_preconditioner


def make_problem(tokens: int, domains: int, E: int, d: int, decades: float, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    scales = torch.logspace(0, -decades, d)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    X = []
    for _ in range(domains):
        mean = 0.5 * torch.randn(d, generator=g)
        X.append(((torch.randn(tokens, d, generator=g) + mean) * scales @ rotation).to(device))
    logit_scale = 1.5 / float(scales.square().sum().sqrt())
    base = torch.randn(E, d, generator=g) * logit_scale
    W = [(base + 0.3 * logit_scale * torch.randn(E, d, generator=g)).to(device) for _ in range(domains)]
    merged = sum(W) / domains + 0.1 * logit_scale * torch.randn(E, d, generator=g).to(device)
    return X, W, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per domain")
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--E", type=int, default=64)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--decades", type=float, default=2.0, help="activation singular values span 10^decades")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--kind", default="softmax", choices=["softmax", "sigmoid"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--preconditioners", default=",".join(PRECONDITIONERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    X, W, merged = make_problem(args.tokens, args.domains, args.E, args.d, args.decades, args.device)

    start = time.perf_counter()
    system = HarcSystem(
        [
            DomainCurvature(x, w, kind=args.kind, dtype=dtype, batch_size=args.batch_size)
            for x, w in zip(X, W, strict=True)
        ],
        args.gamma,
    )
    rhs = system.rhs()
    common_setup = time.perf_counter() - start

    def operator_pass() -> float:
        """Median seconds of one operator application (re-measured per row: the machine may be shared)."""
        times = []
        for _ in range(3):
            start = time.perf_counter()
            system.apply(merged)
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    print(
        f"HARC CG, {args.domains} domains x {args.tokens} tokens, E={args.E}, d={args.d}, kind={args.kind}, "
        f"gamma={args.gamma}, decades={args.decades}, {args.dtype}, tol={args.tol:g}, init=merged, "
        f"device={args.device}, torch threads={torch.get_num_threads()}"
    )
    print(f"statistics + right-hand side {common_setup:.2f} s (all rows, not in the table)")
    print()
    header = (
        f"{'preconditioner':>14} | {'iters':>5} {'true rel.res':>12} {'conv':>4} | {'setup s':>8} {'CG s':>8} "
        f"{'total s':>8} | {'pass s':>6} {'setup passes':>12} {'total passes':>12}"
    )
    print(header)
    print("-" * len(header))
    rows = {}
    for name in args.preconditioners.split(","):
        one_pass = operator_pass()
        start = time.perf_counter()
        pre = build_preconditioner(system, name, dtype=dtype)  # type: ignore[arg-type]
        setup = time.perf_counter() - start
        result = conjugate_gradient(
            system.apply,
            rhs,
            merged,
            preconditioner=pre,
            project=system.null_space_projector(),
            tol=args.tol,
            max_iter=args.max_iter,
            dtype=dtype,
        )
        total = setup + result.seconds
        rows[name] = result.iterations
        print(
            f"{name:>14} | {result.iterations:>5} {result.relative_residual:>12.2e} "
            f"{'yes' if result.converged else 'NO':>4} | "
            f"{setup:>8.2f} {result.seconds:>8.2f} {total:>8.2f} | "
            f"{one_pass:>6.3f} {setup / one_pass:>12.1f} {total / one_pass:>12.1f}"
        )
        del pre
    if "none" in rows and "block" in rows and rows["block"]:
        print(f"\niterations none / block = {rows['none'] / rows['block']:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
