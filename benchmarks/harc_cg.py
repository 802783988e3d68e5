"""Time to tolerance for each preconditioner, side by side, on OLMoE-sized router shapes.

Synthetic but shaped like the real problem: E = 64 experts, d = 2048, K source domains whose
activations are anisotropic (X = G diag(logspace(0, -decades)) Q with Q a random rotation, plus a
per-domain mean), source routers that are fine-tunes of one base router (logit std ~1.5) and a
stage-1 merge near their average. The statistics every row shares (curvature, right-hand side,
diagonal) are timed once; each row's total is its preconditioner's set-up plus CG. Rows are run
round-robin ``--repeats`` times (a machine shared with other jobs slows them alike) and the ratio
to ``diagonal`` (Jacobi, the authors' option) is the median of the per-round ratios. "passes"
expresses times in operator applications over all tokens, which carries over to other token
counts and hardware. Goal (issue 18): the default (``auto``) at most 1/4 of ``diagonal``.

    python benchmarks/harc_cg.py --preconditioners auto,diagonal,kronecker --repeats 3 [--kind sigmoid]
        [--tokens 4096 --domains 3 --E 64 --d 2048 --gamma 0.9 --threads 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import dataclass

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
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    system.unblended_diagonal()
    common_setup = time.perf_counter() - start
    names = args.preconditioners.split(",")

    print(
        f"HARC CG, {args.domains} domains x {args.tokens} tokens, E={args.E}, d={args.d}, kind={args.kind}, "
        f"gamma={args.gamma}, decades={args.decades}, {args.dtype}, tol={args.tol:g}, init=merged, "
        f"device={args.device}, torch threads={torch.get_num_threads()}, {args.repeats} interleaved rounds, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    print(f"statistics + right-hand side + diagonal {common_setup:.2f} s (shared by all rows, not in the table)")
    print()
    rounds: dict[str, list[Row]] = {name: [] for name in names}
    for _ in range(args.repeats):  # round-robin, so that a machine shared with other jobs slows all rows alike
        for name in names:
            rounds[name].append(solve_once(system, rhs, merged, name, args, dtype))
    header = (
        f"{'preconditioner':>14} {'used':>9} | {'iters':>5} {'true rel.res':>12} {'|w-w_ref|':>9} | {'setup s':>8} "
        f"{'CG s':>7} {'total s':>8} {'/ diag':>6} | {'pass s':>6} {'M^-1 ms':>7} {'M^-1/pass':>9} {'passes':>6}"
    )
    print(header)
    print("-" * len(header))
    reference = min((r[0] for r in rounds.values()), key=lambda row: row.residual).solution
    for name in names:
        rows = rounds[name]
        med = Row.median(rows)
        ratio = (
            ""
            if "diagonal" not in rounds
            else f"{statistics.median(r.total / d.total for r, d in zip(rows, rounds['diagonal'], strict=True)):>6.2f}"
        )
        error = float(torch.linalg.vector_norm(rows[0].solution - reference) / torch.linalg.vector_norm(reference))
        print(
            f"{name:>14} {rows[0].used:>9} | {rows[0].iterations:>5} {rows[0].residual:>12.2e} {error:>9.1e} | "
            f"{med.setup:>8.2f} {med.cg:>7.2f} {med.total:>8.2f} {ratio:>6} | {med.one_pass:>6.3f} "
            f"{med.apply_inverse * 1e3:>7.2f} {med.apply_inverse / med.one_pass:>9.1%} {med.total / med.one_pass:>6.1f}"
        )
    print(
        "\n/ diag: median over rounds of (total / diagonal's total in the same round); passes: total / one operator "
        "pass; M^-1: one application of the preconditioner (its per-iteration overhead); |w-w_ref|: relative "
        "distance to the row with the smallest true residual"
    )


@dataclass(frozen=True)
class Row:
    used: str
    iterations: int
    residual: float
    setup: float
    cg: float
    one_pass: float
    apply_inverse: float
    solution: torch.Tensor

    @property
    def total(self) -> float:
        return self.setup + self.cg

    @staticmethod
    def median(rows: list[Row]) -> Row:
        def mid(field: str) -> float:
            return statistics.median(getattr(r, field) for r in rows)

        first = rows[0]
        return Row(
            first.used,
            first.iterations,
            first.residual,
            mid("setup"),
            mid("cg"),
            mid("one_pass"),
            mid("apply_inverse"),
            first.solution,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solve_once(system: HarcSystem, rhs: torch.Tensor, merged: torch.Tensor, name: str, args, dtype) -> Row:
    """Build ``name`` and solve; time one operator pass and one preconditioner application next to it."""
    start = time.perf_counter()
    system.apply(merged)
    _sync(merged.device)
    one_pass = time.perf_counter() - start
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
    residual = rhs.to(dtype)
    start = time.perf_counter()
    for _ in range(5):
        pre(residual)
    _sync(merged.device)
    apply_inverse = (time.perf_counter() - start) / 5
    return Row(
        pre.name,
        result.iterations,
        result.relative_residual,
        setup,
        result.seconds,
        one_pass,
        apply_inverse,
        result.solution,
    )


if __name__ == "__main__":
    main()
