"""Peak memory and wall time of a stage-1 merge: moemerge's streaming driver against mergekit.

Builds (once, cached in --workdir) a random Mixtral-shaped base of about 1.5 GB in float32 and
three noisy fine-tunes of it, then merges them with the same recipe (TIES by default) in each
tool, each in a fresh subprocess. Memory is read from /proc: the child reports its own VmHWM
(peak RSS) and the parent samples the child's RssAnon (heap: tensors) and RssFile (mapped
checkpoint pages: page cache, reclaimable) every 20 ms. `getrusage(...).ru_maxrss` is not used:
Linux carries it over fork and exec, so a child of a parent that once held a model reports the
parent's peak.

moemerge's bound: RSS after imports + (K+1) x largest tensor (float32 work dtype) + one output
shard + the pages the readers keep mapped until they release them ((K+1) x 64 MiB), plus what the
kernel allocates beside its inputs (TIES: K task vectors, their signs, masks, products).

    python benchmarks/merge_memory.py [--workdir /tmp/moemerge-bench] [--method ties] [--shard-size 500MB]

moemerge's run also times its NaN/Inf checks (moemerge/finite.py) from inside and prints their
share of the merge's wall time under the table; that share includes reading the pages the check
touches first, which the merge would read anyway. The cost itself is measured side by side:
`--tools moemerge,moemerge-unchecked --repeat 3` (the same merge with the checks replaced by
nothing, runs alternating) prints the median wall times and their ratio.

A table, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
}
K = 3


def build_models(workdir: Path) -> None:
    """Base + K noisy sources, written once; reruns reuse them."""
    import torch

    from moemerge.architectures.tiny import tiny_model
    from moemerge.checkpoint.reader import CheckpointReader
    from moemerge.checkpoint.writer import CheckpointWriter

    paths = {"base": workdir / "base", **{f"s{i}": workdir / f"s{i}" for i in range(K)}}
    if not (paths["base"] / "config.json").is_file():
        print(f"building the base in {paths['base']} ...", file=sys.stderr)
        tiny_model("mixtral", seed=0, **SIZES).save_pretrained(paths["base"], max_shard_size="1GB")
    for i in range(K):
        out = paths[f"s{i}"]
        if (out / "config.json").is_file():
            continue
        print(f"building source {i} in {out} ...", file=sys.stderr)
        gen = torch.Generator().manual_seed(100 + i)
        with CheckpointReader(paths["base"]) as reader, CheckpointWriter(out, max_shard_bytes=10**9) as writer:
            for name in reader.names():
                t = reader.read(name)
                writer.add(name, t + 0.01 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
            writer.copy_support_files(paths["base"])
            writer.finalize()


def recipe_text(paths: dict[str, Path], method: str) -> str:
    import yaml

    from moemerge.merge.registry import get_method

    fields = get_method(method).source_params_model.model_fields
    parameters = {"weight": 1.0 / K, "density": 0.5}
    parameters = {k: v for k, v in parameters.items() if k in fields}  # linear has no density
    models = [{"model": str(paths[f"s{i}"]), "parameters": parameters} for i in range(K)]
    recipe = {"merge_method": method, "base_model": str(paths["base"]), "models": models, "dtype": "float32"}
    return yaml.safe_dump(recipe, sort_keys=False)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of /proc/PID/status, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def run_one(tool: str, recipe_path: Path, out: Path, shard_bytes: int) -> None:
    """Child process: import, note RSS, merge, print wall time and peak RSS (VmHWM) as JSON."""
    import shutil

    import torch  # noqa: F401  (moemerge imports these lazily: load them before the baseline)
    import transformers  # noqa: F401
    import yaml

    if tool.startswith("moemerge"):
        from moemerge.pipeline.stage1 import merge_checkpoints

        checks = _time_finite_checks(enabled=tool != "moemerge-unchecked")
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    shutil.rmtree(out, ignore_errors=True)
    after_imports = proc_status()["VmRSS"]
    start = time.perf_counter()
    if tool.startswith("moemerge"):
        merge_checkpoints(recipe_path, out, max_shard_bytes=shard_bytes, progress=False)
    else:
        config = MergeConfiguration.model_validate(yaml.safe_load(recipe_path.read_text()))
        options = MergeOptions(lazy_unpickle=False, copy_tokenizer=False, out_shard_size=shard_bytes, quiet=True)
        run_merge(config, str(out), options=options)
    wall = time.perf_counter() - start
    peak = proc_status()["VmHWM"]
    row = {"tool": tool, "wall_s": wall, "peak_rss": peak, "rss_after_imports": after_imports}
    if tool == "moemerge":
        row["finite_s"] = checks["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row))


def _time_finite_checks(enabled: bool) -> dict[str, float]:
    """Wrap the stage-1 NaN/Inf checks (moemerge/finite.py, as merge/tensors.py calls them) in a timer, or
    replace them by nothing (`moemerge-unchecked`: the same merge without them, for the side-by-side cost)."""
    from moemerge.merge import tensors

    spent = {"seconds": 0.0}

    def timed(check):
        def run(*args, **kwargs):
            if not enabled:
                return None
            start = time.perf_counter()
            try:
                return check(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        return run

    tensors.check_finite = timed(tensors.check_finite)
    tensors.check_cast = timed(tensors.check_cast)
    is_finite = timed(tensors.is_finite)
    tensors.is_finite = is_finite if enabled else lambda tensor: True
    return spent


def measure(cmd: list[str]) -> dict:
    """Run one child, sampling its anonymous and file-backed RSS; its JSON line plus those peaks."""
    import tempfile

    with tempfile.TemporaryFile("w+") as stdout:
        child = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL, text=True)
        peak_anon = peak_file = 0
        while child.poll() is None:
            try:
                status = proc_status(child.pid)
            except OSError:  # exited between poll and read
                break
            peak_anon = max(peak_anon, status.get("RssAnon", 0))
            peak_file = max(peak_file, status.get("RssFile", 0))
            time.sleep(0.02)
        if child.wait() != 0:
            raise SystemExit(f"{' '.join(cmd)} failed with status {child.returncode}")
        stdout.seek(0)
        row = json.loads(stdout.read().strip().splitlines()[-1])
    return {**row, "peak_anon": peak_anon, "peak_file": peak_file}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-bench"))
    parser.add_argument("--method", default="ties")
    parser.add_argument("--shard-size", default="500MB", help="output shard size for both tools")
    parser.add_argument("--tools", default="moemerge,mergekit", help="also moemerge-unchecked: no NaN/Inf checks")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from moemerge.merge.tensors import RELEASE_BYTES
    from moemerge.units import parse_size

    shard_bytes = parse_size(args.shard_size)
    recipe_path = args.workdir / f"{args.method}.yaml"
    if args.run_one:
        run_one(args.run_one, recipe_path, args.out, shard_bytes)
        return
    if args.build_only:
        build_models(args.workdir)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    # built in a child so that this process, which samples the merges, stays small
    subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--build-only"], check=True)
    paths = {"base": args.workdir / "base", **{f"s{i}": args.workdir / f"s{i}" for i in range(K)}}
    recipe_path.write_text(recipe_text(paths, args.method))

    from moemerge.checkpoint.reader import CheckpointReader

    with CheckpointReader(paths["base"]) as reader:
        largest = max(reader.names(), key=lambda n: reader.info(n).nbytes)
        info = reader.info(largest)
        model_bytes = reader.total_bytes
    work_bytes = info.nbytes * 4 // {"F32": 4, "BF16": 2, "F16": 2}.get(info.dtype, 4)  # float32 work dtype

    rows = []
    tools = args.tools.split(",")
    for repeat in range(args.repeat):  # alternating, so that a busy spell of the machine hits every tool alike
        for tool in tools if repeat % 2 == 0 else tools[::-1]:
            cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--method", args.method]
            cmd += ["--shard-size", args.shard_size, "--run-one", tool, "--out", str(args.workdir / f"out-{tool}")]
            rows.append(measure(cmd))

    gb = 1e9
    print(f"\nmodel: Mixtral-shaped {json.dumps(SIZES)}")
    print(f"each checkpoint {model_bytes / gb:.2f} GB ({info.dtype}); K = {K} sources + base; method {args.method}")
    print(f"largest tensor: {largest} {list(info.shape)} = {info.nbytes / gb:.3f} GB on disk")
    print(f"output shard size: {shard_bytes / gb:.2f} GB (both tools)\n")
    header = ["tool", "wall s", "peak RSS", "after imports", "peak - imports", "peak anon", "peak file-mapped"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        cells = [row["peak_rss"], row["rss_after_imports"], row["peak_rss"] - row["rss_after_imports"]]
        cells += [row["peak_anon"], row["peak_file"]]
        print(" | ".join([row["tool"], f"{row['wall_s']:.0f}", *(f"{c / gb:.2f} GB" for c in cells)]))
    inputs = (K + 1) * work_bytes
    mapped = (K + 1) * (RELEASE_BYTES + info.nbytes)
    print(f"\n(K+1) x largest tensor in float32                = {inputs / gb:.2f} GB")
    print(f"  + one output shard                             = {(inputs + shard_bytes) / gb:.2f} GB")
    print(f"  + readers' mapped pages, (K+1) x (64 MiB + largest) = {(inputs + shard_bytes + mapped) / gb:.2f} GB")
    print("  + the kernel's temporaries (the rest of 'peak - imports')")
    walls = {tool: [r["wall_s"] for r in rows if r["tool"] == tool] for tool in ("moemerge", "moemerge-unchecked")}
    if all(walls.values()):
        checked, unchecked = (statistics.median(w) for w in walls.values())
        print(
            f"\nside by side, median of {args.repeat}: {checked:.1f} s with the NaN/Inf checks, {unchecked:.1f} s "
            f"without: +{100 * (checked / unchecked - 1):.1f} %"
        )
    for row in rows:
        if "finite_s" in row:
            share = 100 * row["finite_s"] / row["wall_s"]
            print(
                f"\nNaN/Inf checks (every tensor read, every tensor written): {row['finite_s']:.2f} s of the "
                f"{row['wall_s']:.1f} s merge = {share:.1f} %"
            )


if __name__ == "__main__":
    main()
