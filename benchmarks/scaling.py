"""How one OLMoE-shaped layer's calibration scales with tokens, ranks and activation storage dtype.

Measured in one run; every configuration runs in fresh processes, and peak memory is each
process's VmHWM after a reset (/proc/self/clear_refs) minus its RSS just before the
activations exist, so it is the memory the layer's calibration adds. Three tables:

1. Router solve (moemerge.calibrate.solve.solve_router, softmax, E = 64, d = 2048, K = 3
   domains, gamma 0.9, kronecker, float32 work, tol 1e-6, float32 storage) against total
   calibration tokens and ranks. R ranks are R gloo processes with one thread each (one core
   per rank), the tokens sharded by batch as the runner shards them, every
   sum over tokens all-reduced (the runner's `reduce` hook). "planned" is the memory planner's
   estimate (moemerge/calibrate/memory.py: router inputs + solver).
2. Activation storage dtype: the same solve on the same tokens with X stored in float64,
   float32, bfloat16, float16, solved in float64 to tol 1e-9 (so only storage differs), plus
   the default float32 solver: relative difference of W to the float64 solution, and top-8
   agreement of the routing it gives with the float64 solution's on 4096 tokens per domain.
3. The forward of one OLMoE decoder layer (transformers' OlmoeModel with one layer, random
   weights, float32): seconds and peak memory per token, the other per-token cost of a layer
   (run twice per MoE layer: recording, then with the new router).

Activations are synthetic but anisotropic like real ones: X = (G + mu_i) diag(logspace(0, -2, d)) Q
with Q a random rotation; source routers are fine-tunes of one base router, the stage-1 merge
their average plus noise (as in benchmarks/harc_cg.py).

    python benchmarks/scaling.py [--tokens 10000,30000,100000] [--ranks 1,2] [--dtype-tokens 6000] [--threads 1]

A table, not a test: the numbers depend on the machine (and on its other load).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

E, D, K, TOP_K, BLOCK = 64, 2048, 3, 8, 4096


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; return the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _problem(seed: int = 0):
    """Scales, rotation, per-domain means, source routers, merged router (all small, same in every process)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, D)
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    means = [0.5 * torch.randn(D, generator=g) for _ in range(K)]
    logit_scale = 1.5 / float(scales.square().sum().sqrt())
    base = torch.randn(E, D, generator=g) * logit_scale
    sources = [base + 0.3 * logit_scale * torch.randn(E, D, generator=g) for _ in range(K)]
    merged = sum(sources) / K + 0.1 * logit_scale * torch.randn(E, D, generator=g)
    return scales, rotation, means, sources, merged


def _block(domain: int, block: int, n: int, scales, rotation, means):
    import torch

    g = torch.Generator().manual_seed(1_000_003 * (domain + 1) + block)
    return ((torch.randn(n, D, generator=g) + means[domain]) * scales) @ rotation


def child_solve(config: dict) -> dict:
    """One rank of one solve; writes the solution (rank 0) and returns timings and memory."""
    import torch

    from moemerge.calibrate.memory import solver_bytes
    from moemerge.calibrate.options import RouterSolveOptions
    from moemerge.calibrate.solve import solve_router
    from moemerge.distributed import assign_shards, init_ranks

    torch.set_num_threads(config["threads"])
    ranks = init_ranks("cpu")
    scales, rotation, means, sources, merged = _problem()
    storage = getattr(torch, config["storage"])
    per_domain = config["tokens"] // K
    blocks = [min(BLOCK, per_domain - s) for s in range(0, per_domain, BLOCK)]
    mine = assign_shards(blocks, ranks.world_size)[ranks.rank]
    baseline = _reset_peak()
    start = time.perf_counter()
    X = []
    for domain in range(K):
        x = torch.empty(sum(blocks[b] for b in mine), D, dtype=storage)
        row = 0
        for b in mine:
            x[row : row + blocks[b]] = _block(domain, b, blocks[b], scales, rotation, means).to(storage)
            row += blocks[b]
        X.append(x)
    generate = time.perf_counter() - start
    _reset_peak()  # the generator's temporaries are not the solve's; X itself stays counted via `baseline`
    harc = RouterSolveOptions(
        dtype=config["solver_dtype"], tol=config["tol"], preconditioner=config["preconditioner"], max_iter=2000
    )
    ranks.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    solution = solve_router(X, sources, merged, kind="softmax", options=harc, reduce=ranks.reduce)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    local = sum(x.shape[0] for x in X)
    planned = local * D * storage.itemsize + solver_bytes(local, E, D, K, harc, solution.stats.preconditioner)
    if ranks.is_writer and config.get("save"):
        torch.save(solution.weight.to(torch.float64), config["save"])
    return {
        "rank": ranks.rank,
        "local_tokens": local,
        "generate_s": generate,
        "solve_s": wall,
        "cpu_s": cpu,
        "setup_s": solution.stats.setup_seconds,
        "cg_s": solution.stats.cg_seconds,
        "iterations": solution.stats.iterations,
        "residual": solution.stats.relative_residual,
        "peak_bytes": _status("VmHWM") - baseline,
        "planned_bytes": planned,
    }


def child_forward(config: dict) -> dict:
    """Forward of one OLMoE decoder layer (random weights) on `tokens` tokens in sequences of 512."""
    import torch
    from transformers import AutoModel, OlmoeConfig

    torch.set_num_threads(config["threads"])
    cfg = OlmoeConfig(
        hidden_size=D,
        intermediate_size=1024,
        num_experts=E,
        num_experts_per_tok=TOP_K,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=1,
        vocab_size=1024,
    )
    model = AutoModel.from_config(cfg, dtype=torch.float32).eval()
    seq = 512
    x = torch.randn(config["tokens"] // seq, seq, D) * 0.1
    baseline = _reset_peak()
    with torch.no_grad():
        model(inputs_embeds=x[:1])  # warm up
        start = time.perf_counter()
        model(inputs_embeds=x)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": _status("VmHWM") - baseline, "tokens": x.shape[0] * seq}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, config: dict, world: int) -> list[dict]:
    """Run `kind` in `world` fresh processes (gloo ranks when world > 1); their results by rank."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
            if world > 1:
                env |= {
                    "WORLD_SIZE": str(world),
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                }
            out = Path(tmp) / f"rank{rank}.json"
            command = [sys.executable, __file__, "--child", kind, "--config", json.dumps(config), "--out", str(out)]
            procs.append((subprocess.Popen(command, env=env), out))
        results = []
        for proc, out in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"{kind} {config} failed with exit code {proc.returncode}")
            results.append(json.loads(out.read_text()))
        return results


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="10000,30000,100000", help="total calibration tokens (all domains)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (ranks run one thread each)")
    parser.add_argument("--dtype-tokens", type=int, default=6000)
    parser.add_argument("--forward-tokens", type=int, default=2048)
    parser.add_argument("--child", choices=["solve", "forward"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (child_solve if args.child == "solve" else child_forward)(json.loads(args.config))
        Path(args.out).write_text(json.dumps(result))
        return

    import torch

    print(
        f"one OLMoE-shaped layer: E={E}, d={D}, top-{TOP_K}, K={K} domains, gamma 0.9; torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per process; load average {os.getloadavg()[0]:.1f}"
    )
    print("\n1. router solve (kronecker, float32 work, tol 1e-6, float32 storage), per configuration")
    header = (
        f"{'tokens':>8} {'ranks':>5} | {'solve s':>8} {'setup s':>8} {'CG s':>7} {'CPU s/rank':>10} {'iters':>5} "
        f"{'rel.res':>8} | {'s/iter':>7} {'us/token/iter':>13} | {'peak GB/rank':>12} {'planned GB':>10}"
    )
    print(header)
    print("-" * len(header))
    base = {"storage": "float32", "solver_dtype": "float32", "tol": 1e-6, "preconditioner": "kronecker"}
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for world in [int(r) for r in args.ranks.split(",")]:
            results = launch("solve", {**base, "tokens": tokens, "threads": args.threads}, world)
            r0 = results[0]
            per_iter = r0["cg_s"] / max(r0["iterations"], 1)
            print(
                f"{tokens:>8} {world:>5} | {r0['solve_s']:>8.1f} {r0['setup_s']:>8.1f} {r0['cg_s']:>7.1f} "
                f"{max(r['cpu_s'] for r in results):>10.1f} {r0['iterations']:>5} {r0['residual']:>8.1e} | "
                f"{per_iter:>7.2f} {per_iter / tokens * 1e6:>13.3f} | "
                f"{_gb(max(r['peak_bytes'] for r in results)):>12} {_gb(max(r['planned_bytes'] for r in results)):>10}",
                flush=True,
            )

    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"\n2. activation storage dtype, {args.dtype_tokens} tokens, 1 rank (reference: float64 storage and solver)")
    header = (
        f"{'storage':>9} {'solver':>7} {'tol':>6} | {'iters':>5} {'solve s':>7} {'peak GB':>7} | "
        f"{'|W-W64|/|W64|':>13} {'|W-W64|/|W64-Wm|':>16} {'top-8 agreement':>15}"
    )
    print(header)
    print("-" * len(header))
    rows = [
        ("float64", "float64", 1e-9),
        ("float32", "float64", 1e-9),
        ("bfloat16", "float64", 1e-9),
        ("float16", "float64", 1e-9),
        ("float32", "float32", 1e-6),
        ("bfloat16", "float32", 1e-6),
    ]
    scales, rotation, means, sources, merged = _problem()
    probe = [_block(i, 0, BLOCK, scales, rotation, means) for i in range(K)]
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for storage, solver, tol in rows:
            save = str(Path(tmp) / f"{storage}-{solver}.pt")
            config = {"storage": storage, "solver_dtype": solver, "tol": tol, "preconditioner": "kronecker"}
            config |= {"tokens": args.dtype_tokens, "threads": args.threads, "save": save}
            r0 = launch("solve", config, 1)[0]
            W = torch.load(save)
            if reference is None:
                reference = W
            diff = (W - reference).norm().item()
            agreement = sum(_agreement(x.double() @ reference.T, x.double() @ W.T) for x in probe) / len(probe)
            update = (reference - merged.double()).norm().item()
            print(
                f"{storage:>9} {solver:>7} {tol:>6.0e} | {r0['iterations']:>5} {r0['solve_s']:>7.1f} "
                f"{_gb(r0['peak_bytes']):>7} | {diff / reference.norm().item():>13.2e} {diff / update:>16.2e} "
                f"{agreement:>15.5f}",
                flush=True,
            )

    print(f"\n3. forward of one OLMoE decoder layer (random weights, float32), {args.forward_tokens} tokens")
    result = launch("forward", {"tokens": args.forward_tokens, "threads": args.threads}, 1)[0]
    print(
        f"{result['seconds']:.2f} s = {result['seconds'] / result['tokens'] * 1e3:.2f} ms/token; "
        f"peak {_gb(result['peak_bytes'])} GB beside the weights ({result['peak_bytes'] / result['tokens'] / 1e6:.2f} "
        "MB/token)"
    )


def _agreement(reference_logits, logits) -> float:
    """Mean fraction of each token's top-k experts under the reference that `logits` also picks."""
    ref = reference_logits.topk(TOP_K, dim=1).indices
    got = logits.topk(TOP_K, dim=1).indices
    return float((ref[:, :, None] == got[:, None, :]).any(dim=2).double().mean())


if __name__ == "__main__":
    main()
