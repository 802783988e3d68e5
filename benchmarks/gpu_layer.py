"""One real-width MoE layer calibrated end to end on each device, and the routers compared.

Writes a random one-layer OLMoE model at a real router width (default d 2048, E 64, expert width
1024, top-8: OLMoE-1B-7B's layer) with the shipped specialists' tokenizer, three "specialists"
(the base with its router and experts perturbed), merges them (task arithmetic) and runs the
whole stage 2 (`moemerge.calibrate.runner.calibrate`: walk, router inputs, HARC solve, output)
on each device in ``--devices``, on the shipped calibration text. Prints wall time, CG
iterations and preconditioner per device, and the relative difference of every calibrated
router to the first device's (float32 solves to tol 1e-6 on two devices: expect ~1e-6 to 1e-5).

    python benchmarks/gpu_layer.py OUT_DIR [--devices cuda,cpu] [--hidden 2048 --experts 64 --intermediate 1024]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.runner import Domain, calibrate
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.config import Recipe
from moemerge.pipeline.stage1 import merge_checkpoints

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "specialists"
DOMAINS = ("code", "prose", "math")


def write_models(folder: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """A random base at the requested width and three perturbed copies, safetensors, shipped tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shipped_base = SHIPPED / "checkpoints" / "olmoe" / "base"
    config = AutoConfig.from_pretrained(shipped_base)
    heads = args.hidden // 128
    config.update(
        {
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_experts": args.experts,
            "num_experts_per_tok": args.top_k,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": 128,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16 on disk, as OLMoE ships
    paths = []
    for i, name in enumerate(("base", *DOMAINS)):
        path = folder / name
        if i:
            generator = torch.Generator().manual_seed(i)
            state = model.state_dict()
            for key, tensor in state.items():
                if ".mlp." in key:
                    scale = 0.3 if key.endswith("mlp.gate.weight") else 0.02
                    noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std() * scale
                    tensor.add_(noise.to(tensor.dtype))
        model.save_pretrained(path)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(shipped_base / file, path / file)
        paths.append(path)
        if i:
            model = AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.bfloat16)
    return paths[0], paths[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base, sources = write_models(args.out, args)
    recipe = Recipe(merge_method="task_arithmetic", base_model=str(base), models=[{"model": str(p)} for p in sources])
    merged = merge_checkpoints(recipe, args.out / "stage1", progress=False)
    domains = [Domain(str(p), (str(SHIPPED / "data" / f"{d}.jsonl"),)) for p, d in zip(sources, DOMAINS, strict=True)]
    routers: dict[str, dict[str, torch.Tensor]] = {}
    print(f"one OLMoE layer: d {args.hidden}, E {args.experts}, expert width {args.intermediate}, top-{args.top_k}")
    for device in args.devices.split(","):
        options = CalibrationOptions(
            device=device, data={"max_samples": args.max_samples, "max_length": args.max_length}
        )
        out = args.out / f"calibrated-{device}"
        start = time.perf_counter()
        calibrate(str(merged), domains, out, options, overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        summary = json.loads((out / "moemerge_calibration.json").read_text())
        reader = CheckpointReader(out)
        routers[device] = {
            name: reader.read(name).float() for name in reader.names() if name.endswith("mlp.gate.weight")
        }
        for layer in summary["layers"]:
            print(
                f"{device:>5}: {seconds:7.1f} s end to end; layer {layer['layer']}: {layer['preconditioner']}, "
                f"{layer['iterations']} iterations, residual {layer['relative_residual']:.1e}, "
                f"solve {layer['seconds']:.2f} s"
            )
    first, *others = routers
    for device in others:
        for name, weight in routers[first].items():
            other = routers[device][name]
            difference = float(torch.linalg.vector_norm(other - weight) / torch.linalg.vector_norm(weight))
            print(f"{name}: |W_{device} - W_{first}| / |W_{first}| = {difference:.2e}")


if __name__ == "__main__":
    main()
