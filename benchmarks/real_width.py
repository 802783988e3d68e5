"""`moemerge run` with ``experts: true`` on random-weight checkpoints at real widths: time per stage, peak memory.

Shapes (``--shape``): OLMoE-1B-7B (64 experts, top-8, hidden 2048, expert width 1024, vocab 50304),
Qwen3-30B-A3B (128 / 8, 2048, 768, 151936) and DeepSeek-V3 (sigmoid router, a shared expert, a dense
first layer; ``--experts`` of its 256 routed experts, top-8, hidden 7168, expert width 2048, vocab
129280), with ``--layers`` decoder layers. A base model and three sources (the base plus noise) are
written in bfloat16 under ``--root``; stage 1 (``moemerge merge``, linear) and stage 2 (``moemerge run
--stage1 ... --max-memory``) run in fresh processes whose resident memory is sampled every 20 ms.
Calibration text: the demo's three domains (examples/specialists/data, character tokens), ``--samples`` per
domain of at most 256 tokens; ``--scale 1 4`` adds a run with 4x those tokens: 4x the samples where the text has
them (64 per domain), otherwise the same samples at 4x the length (the shipped samples hold 300-1200 characters:
3.7x the tokens at 32 samples of at most 1024).

Printed per run: the plan's peak against the measured peak (RssAnon, the tensors; VmRSS also counts
pages of the memory-mapped checkpoints, which the kernel may drop), and per MoE layer and stage the
measured wall and CPU seconds next to the seconds its arithmetic needs at the float32 (solves:
float64) matmul rate measured in this run with the same threads. Arithmetic counted (multiply-adds x 2):

    forward     per token 2 x (attention, router and the k routed (+ shared) experts' parameters) +
                2 S d for the attention scores (S the sequence length); passes that stop at the experts
                (RegMean's input passes) count attention and router only
    expert sums per token, routed expert and source: d^2 + 10 I d + I^2 (sequential RegMean: Grams,
                right-hand sides, the source's and the merged model's expert outputs)
    solves      per expert: d^3 / 3 + 4 I d^2 + I^3 / 3 + 2 d I^2 (two Cholesky factorisations and solves)
    router      Kronecker Gram 2 N d^2 and 4 N d E per CG iteration (from the layer's summary)

and a kernel table: one MoE layer's experts on 2048 tokens, transformers' default (grouped_mm) and eager
loop with float32 weights, against moemerge's banked forward (bfloat16 bank, one expert cast at a time).

    python benchmarks/real_width.py --shape olmoe --layers 1 --samples 32 --scale 1 4 --max-memory 16GB

``--harc-lazy`` adds two HARC-only runs: under a budget just below the smallest at which the planner holds the
merged model's experts (it then reads them from disk when used), and with the experts held at the same
settings: plan against peak, wall time, and whether the two calibrated models are bit-identical.

A table, not a test. Generated checkpoints are removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "specialists" / "data"
DOMAINS = ("code", "math", "prose")

SHAPES = {
    "olmoe": dict(
        model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
        vocab_size=50304, num_attention_heads=16, num_key_value_heads=16,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
        num_experts=128, num_experts_per_tok=8, vocab_size=151936, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, intermediate_size=18432,
        n_routed_experts=256, num_experts_per_tok=8, vocab_size=129280, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
    ),
}  # fmt: skip
EXPERTS_KEY = {"olmoe": "num_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def config_of(shape: str, layers: int, experts: int | None):
    from transformers import AutoConfig

    sizes = dict(SHAPES[shape])
    model_type = sizes.pop("model_type")
    if experts:
        sizes[EXPERTS_KEY[shape]] = experts
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, max_position_embeddings=4096, **sizes)
    config.dtype = "bfloat16"
    return config


def disk_shapes(config) -> dict[str, tuple[int, ...]]:
    """On-disk tensor names and shapes of a model of `config`, from transformers' save-time conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    from moemerge.architectures.layout import build_meta_model

    model = build_meta_model(config)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers(remove_duplicate=False))}
    state = {n: t for n, t in state.items() if n in dict(model.state_dict(keep_vars=True))}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {n: tuple(t.shape) for n, t in revert_weight_conversion(model, state).items()}


def _values(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if "norm" in name or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if "bias" in name:
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_model(folder: Path, config, shapes: dict[str, tuple[int, ...]], noise_seed: int | None) -> None:
    """A bfloat16 checkpoint, one shard per decoder layer; a source is the base plus 10 % noise."""
    from safetensors.torch import save_file

    from moemerge.architectures.tiny import tiny_tokenizer
    from moemerge.calibrate.walk import LAYER_INDEX

    folder.mkdir(parents=True)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        match = LAYER_INDEX.search(name)
        groups.setdefault(f"layer{int(match.group(1)):03d}" if match else "outside", []).append(name)
    weight_map = {}
    for n, (group, names) in enumerate(sorted(groups.items())):
        tensors = {}
        for i, name in enumerate(names):
            value = _values(name, shapes[name], seed=hash((group, i)) % 2**31)
            if noise_seed is not None and value.dtype == torch.bfloat16 and "norm" not in name:
                generator = torch.Generator().manual_seed(noise_seed * 1_000_003 + n * 1009 + i)
                value = (value.float() + torch.randn(value.shape, generator=generator) * 0.002).to(torch.bfloat16)
            tensors[name] = value.contiguous()
        file = f"model-{group}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def build(root: Path, args: argparse.Namespace) -> dict:
    config = config_of(args.shape, args.layers, args.experts)
    shapes = disk_shapes(config)
    models = [root / "base"] + [root / f"source{k}" for k in range(1, 4)]
    for k, folder in enumerate(models):
        if not folder.exists():
            write_model(folder, config, shapes, None if k == 0 else k)
    return {"config": config, "base": str(models[0]), "sources": [str(m) for m in models[1:]], "shapes": shapes}


SHIPPED_SAMPLES = 64
"""Samples per domain in examples/specialists/data."""


def text_at(samples: int, scale: int) -> tuple[int, int]:
    """(samples, max length) of a run with `scale` times the tokens of `samples` samples of at most 256 tokens."""
    if samples * scale <= SHIPPED_SAMPLES:
        return samples * scale, 256
    return samples, 256 * scale


def recipe(root: Path, setup: dict, samples: int, args: argparse.Namespace, max_length: int = 256) -> Path:
    import yaml

    domains = {s: [str(DATA / f"{d}.jsonl")] for s, d in zip(setup["sources"], DOMAINS, strict=True)}
    text = {
        "merge_method": "linear",
        "models": [{"model": s, "parameters": {"weight": 1.0}} for s in setup["sources"]],
        "dtype": "bfloat16",
        "tokenizer_source": setup["base"],
        "calibrate": {
            "domains": domains,
            "experts": True,
            "batch_tokens": args.batch_tokens,
            "data": {"max_length": max_length, "max_samples": samples, "heldout": 0},
        },
    }
    path = root / f"recipe-{samples}x{max_length}.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            values[key] = int(line.split()[1]) * 1024
    return values


def run_measured(command: list[str], threads: int) -> dict:
    """Run `command`, sampling its resident memory every 20 ms; wall seconds, peaks, stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                now = _status(process.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            for key in peaks:
                peaks[key] = max(peaks[key], now.get(key, 0))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    err = []
    for line in process.stderr:  # echoed as it comes: the plan is printed before any work
        err.append(line)
        print("   >", line, end="", flush=True)
    out = process.stdout.read()
    process.wait()
    stop.set()
    thread.join()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rc": process.returncode, "out": out, "err": "".join(err), **peaks}


def matmul_rate(dtype: torch.dtype, threads: int, n: int = 2048) -> tuple[float, float]:
    """(flop per wall second, flop per CPU second) of an n x n x n matmul in `dtype` on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    repeats, wall, cpu = 5, time.perf_counter(), time.process_time()
    for _ in range(repeats):
        a @ b
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    flops = repeats * 2 * n**3
    return flops / wall, flops / cpu


def kernels(config, threads: int, tokens: int = 2048) -> list[tuple[str, float, float]]:
    """One MoE layer's experts forward on `tokens` tokens: (implementation, wall s, CPU s)."""
    from moemerge.architectures.layout import ExpertPiece
    from moemerge.calibrate.fused_experts import ExpertBank, experts_module, install_bank
    from moemerge.calibrate.walk import build_skeleton

    torch.set_num_threads(threads)
    model = build_skeleton(config, torch.float32)
    layers = model.get_submodule("model.layers")
    index = getattr(config, "first_k_dense_replace", 0)
    _, module = experts_module(layers[index], "kernels")
    generator = torch.Generator().manual_seed(0)
    E, k, d = module.gate_up_proj.shape[0], config.num_experts_per_tok, config.hidden_size
    weights = {}
    for name in ("gate_up_proj", "down_proj"):
        shape = tuple(module._parameters[name].shape)
        weights[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens, d, generator=generator)
    index_k = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(tokens)])
    w_k = torch.rand(tokens, k, generator=generator)
    rows = []

    def timed(name: str, call) -> torch.Tensor:
        wall, cpu = time.perf_counter(), time.process_time()
        out = call()
        rows.append((name, time.perf_counter() - wall, time.process_time() - cpu))
        return out

    for name in ("gate_up_proj", "down_proj"):
        module._parameters[name] = torch.nn.Parameter(weights[name].float(), requires_grad=False)
    with torch.no_grad():
        for implementation in ("grouped_mm", "eager"):
            model.set_experts_implementation(implementation)
            timed(f"transformers {implementation} (float32 weights)", lambda: module(x, index_k, w_k))
        pieces = {n: [[ExpertPiece(n, 0, w.shape[1])] for _ in range(E)] for n, w in weights.items()}
        bank = ExpertBank(None, pieces, {n: tuple(w.shape) for n, w in weights.items()}, torch.bfloat16, False)
        bank.tensors = dict(weights)  # resident: the bfloat16 tensors themselves
        install_bank(module, bank)
        timed("moemerge banked (bfloat16 bank)", lambda: module(x, index_k, w_k))
    flops = 2 * tokens * k * 3 * module.gate_up_proj.shape[1] // 2 * d
    rows.append(("arithmetic (flop)", float(flops), float(flops)))
    return rows


def layer_flops(setup: dict, layer: dict, max_length: int) -> dict[str, float]:
    """Flop of each stage of one MoE layer (module docstring; S is the longest sample, a bound)."""
    config = setup["config"]
    d = config.hidden_size
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    k = config.num_experts_per_tok
    E = layer["regmean"]["experts"]["calibrated"] + layer["regmean"]["experts"]["kept_stage1"]
    index = layer["layer"]
    prefix = f"model.layers.{index}."
    params = {n: math.prod(s) for n, s in setup["shapes"].items() if n.startswith(prefix)}
    routed = sum(v for n, v in params.items() if ".experts." in n and "shared" not in n)
    rest = sum(params.values()) - routed
    tokens = {name: values["tokens"] for name, values in layer["domains"].items()}  # real tokens per domain
    N = sum(tokens.values())
    S = max_length
    full = 2 * (rest + routed / E * k) + 2 * S * d
    attention = 2 * rest + 2 * S * d  # passes that stop at the experts (shared expert not run: a bound)
    groups = layer["regmean"]["experts"]["passes"] // 2  # sequential: a gate/up and a down task per group
    forward_merged = N * (2 * full + groups * attention)
    forward_sources = N * (full + (2 * groups - 1) * attention)
    sums = 2 * N * k * (d * d + 10 * inter * d + inter * inter)
    solves = 2 * E * (d**3 / 3 + 4 * inter * d * d + inter**3 / 3 + 2 * d * inter * inter)
    router = 2 * N * d * d + layer["iterations"] * 4 * N * d * E
    return {
        "forward merged": forward_merged,
        "forward sources": forward_sources,
        "expert sums": sums,
        "expert solves": solves,
        "router solve": router,
    }


def report(setup: dict, label: str, result: dict, rates: dict, out: Path, max_length: int) -> None:
    summary = json.loads((out / "moemerge_calibration.json").read_text())
    plan = [line for line in result["err"].splitlines() if "peak host" in line]
    planned = float(plan[-1].split()[2]) * 1e9 if plan else float("nan")
    print(f"\n### {label}\n")
    print("plan:\n" + "\n".join(line for line in result["err"].splitlines() if line.startswith(("memory plan", "  "))))
    print(
        f"\npeak RssAnon {result['RssAnon'] / 1e9:.2f} GB, VmRSS {result['VmRSS'] / 1e9:.2f} GB, planned "
        f"{planned / 1e9:.2f} GB (RssAnon / plan {result['RssAnon'] / planned:.2f}); wall {result['seconds']:.0f} s"
    )
    memory = summary["memory"]
    print(
        f"the run's own summary: planned {memory['planned_peak_host_gb']:.2f} GB, its stages held at most "
        f"{memory['measured_peak_rss_anon_gb']:.2f} GB RssAnon"
    )
    for layer in summary["layers"]:
        tokens = sum(v["tokens"] for v in layer["domains"].values())
        flops = layer_flops(setup, layer, max_length)
        stages = layer.get("stages", {})
        print(f"\nlayer {layer['layer']}: {tokens} real tokens, {layer['regmean']['experts']['passes']} RegMean passes")
        print("| stage | wall s | CPU s | arithmetic | at matmul rate (CPU s) | CPU / arithmetic | peak RssAnon GB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        layer_cpu = 0.0
        for stage, value in stages.items():
            f = flops.get(stage)
            rate = rates["float64"][1] if stage == "expert solves" else rates["float32"][1]
            ideal = f / rate if f else None
            layer_cpu += value["cpu_seconds"]
            arithmetic = "- | - | - |"
            if f:
                arithmetic = f"{f / 1e12:.2f} Tflop | {ideal:.1f} | {value['cpu_seconds'] / ideal:.1f}x |"
            peak = value.get("peak_rss_anon_gb", float("nan"))
            print(f"| {stage} | {value['seconds']:.1f} | {value['cpu_seconds']:.1f} | {arithmetic} {peak:.2f} |")
        total_wall = sum(v["seconds"] for v in stages.values())
        print(f"| total | {total_wall:.1f} | {layer_cpu:.1f} | | | | |")
        print(f"\ntokens per second (all sources' real tokens, wall): {tokens / total_wall:.1f}")


FULL_MODELS = {  # (d, routed experts, top-k, heads, expert width, other numbers per MoE layer)
    "OLMoE-1B-7B": (2048, 64, 8, 16, 1024, 4 * 2048 * 2048),
    "Qwen3-30B-A3B": (2048, 128, 8, 32, 768, 2 * 2048 * 4096 + 2 * 2048 * 512),
    "DeepSeek-V3": (7168, 256, 8, 128, 2048, 11_510_000_000 - 256 * 3 * 2048 * 7168),
}
"""The walk holds no embedding or output head (walk.py): outside the layers only the final norm (d numbers)."""


def full_model_plans() -> None:
    """The planner's per-rank plans for the full models (bfloat16 checkpoints, experts in a bank), no checkpoint."""
    from moemerge.calibrate.memory import ModelShape, parse_budget, plan_memory
    from moemerge.calibrate.options import CalibrationOptions

    runs = [
        ("CPU, 1 rank, 16GB, demo text 3 x 32 x 256", "cpu", "16GB", 1, [[256] * 32] * 3),
        ("CPU, 1 rank, 16GB, 3 x 2000 x 512", "cpu", "16GB", 1, [[512] * 2000] * 3),
        ("8 GPUs, host=250GB,device=76GB, 3 x 2000 x 512", "cuda", "host=250GB,device=76GB", 8, [[512] * 2000] * 3),
    ]
    for model, (d, E, k, heads, inter, other) in FULL_MODELS.items():
        routed = E * 3 * inter * d
        shape = ModelShape(
            hidden=d, experts=E, top_k=k, heads=heads, expert_width=inter, layer_numbers=routed + other,
            resident_numbers=d, layer_disk_bytes=2 * (routed + other), expert_maps=((2 * inter, d), (d, inter)),
            banked=True, expert_disk_bytes=2 * routed, router_kind="sigmoid" if model == "DeepSeek-V3" else "softmax",
        )  # fmt: skip
        for label, device, budget, ranks, lengths in runs:
            for experts in (False, True):
                options = CalibrationOptions(device=device, experts=experts, batch_tokens=4096)
                print(f"\n== {model}, {label}, {'experts: true' if experts else 'HARC only'}")
                try:
                    plan = plan_memory(
                        shape, lengths, options, parse_budget(budget, device), world_size=ranks, on_gpu=device == "cuda"
                    )
                    print(plan.describe())
                except ValueError as err:
                    print(str(err).splitlines()[0])


def harc_lazy(root: Path, setup: dict, stage1: Path, args: argparse.Namespace) -> None:
    """HARC only (no experts) under a budget just below the smallest at which the planner holds the merged model's
    experts, so that it reads them from disk when used (a lazy bank); then the same settings with the experts held.
    Prints each run's plan against its peak, its wall time, and whether the two models are bit-identical."""
    import yaml

    from moemerge.calibrate.memory import MemoryPlanError
    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.calibrate.runner import Domain, plan_calibration
    from moemerge.checkpoint.reader import CheckpointReader

    text = yaml.safe_load(recipe(root, setup, args.samples, args).read_text())
    section = text["calibrate"] | {"experts": False}
    domains = [Domain(source, tuple(files)) for source, files in section["domains"].items()]
    options = CalibrationOptions.model_validate({k: v for k, v in section.items() if k != "domains"})

    def holds_experts(budget: int) -> bool:
        try:
            plan = plan_calibration(
                str(stage1), domains, options.model_copy(update={"max_memory": budget}), progress=False
            )
        except MemoryPlanError:
            return False
        return plan.merged_bank == "resident"

    low, high = 0, 2**40  # bisect for the smallest budget at which the planner holds the experts
    while high - low > 2**20:
        low, high = (low, (low + high) // 2) if holds_experts((low + high) // 2) else ((low + high) // 2, high)
    budget = int(high * 0.97)
    lazy = plan_calibration(str(stage1), domains, options.model_copy(update={"max_memory": budget}))
    print(
        f"\n### HARC only, {args.samples} samples per domain: the planner holds the experts from "
        f"{high / 1e9:.3f} GB; under {budget / 1e9:.3f} GB the plan is {lazy.merged_bank} (planned here, with this "
        "process's own memory; each run below plans with its own)\n"
    )
    print("| merged model's experts | planned GB | peak RssAnon GB | peak / plan | wall s |")
    print("|---|---:|---:|---:|---:|")
    settings = {"batch_tokens": lazy.batch_tokens, "activation_dtype": lazy.activation_dtype}
    outputs = []
    for name, limit in (("read from disk (lazy bank)", str(budget)), ("held (same settings)", "unlimited")):
        path = root / f"harc-{limit}.yaml"
        harc = {"preconditioner": lazy.preconditioner}
        path.write_text(yaml.safe_dump(text | {"calibrate": section | settings | {"harc": harc}}))
        out = root / f"harc-{limit}"
        command = [sys.executable, "-m", "moemerge", "run", str(path), "-o", str(out), "--stage1", str(stage1)]
        result = run_measured(command + ["--max-memory", limit, "--overwrite"], args.threads)
        if result["rc"]:
            sys.exit(result["err"][-4000:])
        plan = [line for line in result["err"].splitlines() if "peak host" in line]
        planned = float(plan[-1].split()[2]) * 1e9
        peak = result["RssAnon"]
        print(f"| {name} | {planned / 1e9:.3f} | {peak / 1e9:.2f} | {peak / planned:.2f} | {result['seconds']:.0f} |")
        outputs.append(CheckpointReader(out))
    same = outputs[0].names() == outputs[1].names() and all(
        torch.equal(outputs[0].read(n), outputs[1].read(n)) for n in outputs[1].names()
    )
    print(f"\nthe two calibrated models are {'bit-identical' if same else 'DIFFERENT'}")
    for folder in root.glob("harc-*"):
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="olmoe")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, help="routed experts (default: the model's)")
    parser.add_argument("--samples", type=int, default=8, help="samples of at most 256 tokens per domain")
    parser.add_argument("--scale", type=int, nargs="+", default=[1], help="token multiples (text_at)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-memory", default="16GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="/work/bench_tmp/real_width")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--no-kernels", action="store_true")
    parser.add_argument("--full-model-plans", action="store_true", help="only print the planner's full-model plans")
    parser.add_argument(
        "--harc-lazy", action="store_true", help="also HARC only with the merged experts read from disk, and held"
    )
    args = parser.parse_args()
    if args.full_model_plans:
        full_model_plans()
        return

    root = Path(args.root) / f"{args.shape}-{args.layers}l-{args.experts or 'all'}e"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = build(root, args)
    print(f"checkpoints written in {time.perf_counter() - start:.0f} s: {root}", flush=True)
    rates = {name: matmul_rate(getattr(torch, name), args.threads) for name in ("float32", "float64")}
    print(
        "matmul rate (2048^3, wall / CPU): "
        + ", ".join(f"{n} {w / 1e9:.1f} / {c / 1e9:.1f} Gflop/s" for n, (w, c) in rates.items()),
        flush=True,
    )
    if not args.no_kernels:
        rows = kernels(setup["config"], args.threads)
        flops = rows.pop()[1]
        print("\n| experts forward, 2048 tokens | wall s | CPU s | CPU s at the float32 matmul rate |")
        print("|---|---:|---:|---:|")
        for name, wall, cpu in rows:
            print(f"| {name} | {wall:.2f} | {cpu:.2f} | {flops / rates['float32'][1]:.2f} |")
    stage1 = root / "stage1"
    first = recipe(root, setup, args.samples, args)
    if not stage1.exists():
        merged = run_measured([sys.executable, "-m", "moemerge", "merge", str(first), "-o", str(stage1)], args.threads)
        if merged["rc"]:
            sys.exit(merged["err"])
        print(f"\nstage 1 (linear merge): {merged['seconds']:.0f} s, peak RssAnon {merged['RssAnon'] / 1e9:.2f} GB")
    for scale in args.scale:
        samples, max_length = text_at(args.samples, scale)
        path = recipe(root, setup, samples, args, max_length)
        out = root / f"out-{scale}x"
        command = [sys.executable, "-m", "moemerge", "run", str(path), "-o", str(out), "--stage1", str(stage1)]
        result = run_measured(command + ["--max-memory", args.max_memory, "--overwrite"], args.threads)
        if result["rc"]:
            print(result["err"][-4000:])
            continue
        label = f"{args.shape}, {samples} samples of at most {max_length} tokens per domain ({scale}x)"
        report(setup, label, result, rates, out, max_length)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(root / f"out-{scale}x.work", ignore_errors=True)
    if args.harc_lazy:
        harc_lazy(root, setup, stage1, args)
    print(f"\nload average {os.getloadavg()[0]:.1f} (2-core machine shared with other jobs)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
