"""The memory planner's estimate of a walk with ``experts: true`` against the peak it measures.

A random OLMoE (bfloat16 on disk like real checkpoints, float32 forward; default: d 1024, I 512,
E 32, top-4, 1 layer), two sources (the base plus noise) on two domains of real text (the stdlib's
own code and pydoc's topic prose, 16 samples of 256 characters each), calibrated by the runner in
a fresh process per configuration: RegMean of the experts, then HARC. The process samples its
anonymous resident memory (RssAnon: tensors; the memory-mapped checkpoint pages are page cache and
not counted) every 5 ms; the figure compared is its peak above its value after imports, against the
plan's host estimate (moemerge/calibrate/memory.py), which counts the tensors the run allocates (not
the interpreter's and libraries' own memory, nor what the C allocator keeps of freed tensors; run
with MALLOC_MMAP_THRESHOLD_=65536 to see the peak without the latter). A HARC-only run is the
reference for how far the planner was off before it counted RegMean.
The last configuration gives the planner the budget of groups of E / 4 experts at the smallest
batch, so that it must lower ``sums_budget_bytes``.

    python benchmarks/experts_memory.py [--hidden 1024 --width 512 --experts 32 --top-k 4 --layers 1]

A table, not a test: the Python and allocator overheads depend on the machine.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class AnonPeak:
    """Peak RssAnon of this process while running, sampled in a thread."""

    def __enter__(self) -> AnonPeak:
        self.peak, self.running = _status("RssAnon"), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def build(root: Path, args: argparse.Namespace) -> dict:
    """Base model (the merged model), two noisy sources, and two domains of text."""
    import json as json_module
    import pydoc_data.topics

    import torch

    from moemerge.architectures.tiny import tiny_model, tiny_tokenizer

    sizes = dict(
        hidden_size=args.hidden, intermediate_size=args.width, num_experts=args.experts,
        num_experts_per_tok=args.top_k, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=8, head_dim=args.hidden // 8, max_position_embeddings=1024,
    )  # fmt: skip
    base = tiny_model("olmoe", seed=0, **sizes)
    paths = []
    for k in range(3):  # base, then two sources
        model = base if k == 0 else tiny_model("olmoe", seed=0, **sizes)
        if k:
            generator = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.1)
        out = root / f"model{k}"
        model.to(torch.bfloat16).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)
        paths.append(str(out))
    code = inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)
    prose = "\n\n".join(pydoc_data.topics.topics.values())
    data = []
    for name, text in (("code", code), ("prose", prose)):
        file = root / f"{name}.jsonl"
        file.write_text("\n".join(json.dumps({"text": text[i * 256 : (i + 1) * 256]}) for i in range(args.samples)))
        data.append(str(file))
    return {"merged": paths[0], "sources": paths[1:], "data": data}


def child(config: dict) -> dict:
    """One calibration run; the plan's estimate and the measured peak."""
    import torch

    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.calibrate.runner import Calibrator, Domain

    torch.set_num_threads(config["threads"])
    baseline, baseline_anon = _status("VmRSS"), _status("RssAnon")
    setup = config["setup"]
    domains = [Domain(s, (d,)) for s, d in zip(setup["sources"], setup["data"], strict=True)]
    options = CalibrationOptions.model_validate(config["options"])
    start = time.perf_counter()
    with AnonPeak() as peak:
        calibrator = Calibrator(setup["merged"], domains, options, Path(config["work"]))
        calibrator.run(progress=False)
    return {
        "seconds": time.perf_counter() - start,
        "planned": calibrator.plan.host_bytes,
        "peak_anon": peak.peak - baseline_anon,
        "peak_rss": _status("VmHWM") - baseline,
        "describe": calibrator.plan.describe(),
        "passes": [s["experts"]["passes"] for s in calibrator.regmean.summaries.values() if "experts" in s]
        if calibrator.regmean is not None
        else [0],
    }


def budget_for_groups(setup: dict, options: dict, group: int) -> int:
    """The planner's estimate for these options with the experts in groups of `group`: a budget that needs them."""
    from transformers import AutoTokenizer

    from moemerge.architectures.layout import load_layout
    from moemerge.calibrate.memory import MemoryBudget, ModelShape, expert_sums_bytes, plan_memory
    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.checkpoint.reader import CheckpointReader
    from moemerge.data import load_domain

    calibration = CalibrationOptions.model_validate(options)
    tokenizer = AutoTokenizer.from_pretrained(setup["merged"])
    lengths = [
        [len(x) for x in load_domain(s, [f], tokenizer, calibration.data)[0].samples]
        for s, f in zip(setup["sources"], setup["data"], strict=True)
    ]
    shape = ModelShape.of(load_layout(setup["merged"]), CheckpointReader(setup["merged"]))
    regmean = calibration.regmean.model_copy(update={"sums_budget_bytes": group * expert_sums_bytes(shape)})
    return plan_memory(shape, lengths, calibration.model_copy(update={"regmean": regmean}), MemoryBudget()).host_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512, help="expert width I")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16, help="samples of 256 characters per domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    base = {"data": {"max_length": 256}, "batch_tokens": 2048, "experts": True}
    runs = [
        ("HARC only (no --experts)", base | {"experts": False}),
        ("classic", base | {"regmean": {"variant": "classic"}}),
        ("sequential", base | {"regmean": {"variant": "sequential"}}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        setup = build(Path(tmp), args)
        smallest = runs[2][1] | {"batch_tokens": 256}  # no smaller batch to fall back on: the sums must shrink
        budget = budget_for_groups(setup, smallest, args.experts // 4)
        runs.append((f"sequential, --max-memory {budget / 1e9:.3f} GB", smallest | {"max_memory": budget}))
        rows = []
        for i, (name, options) in enumerate(runs):
            config = {"setup": setup, "options": options, "work": f"{tmp}/work{i}", "threads": args.threads}
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            command = [sys.executable, __file__, "--child", json.dumps(config)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]) | {"name": name})
            print(rows[-1]["describe"], flush=True)
    print(
        f"\nOLMoE d {args.hidden}, I {args.width}, E {args.experts}, top-{args.top_k}, {args.layers} layer(s), "
        f"2 sources x {args.samples} samples; {args.threads} threads, load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| run | passes per layer | planned GB | peak anon GB | peak RSS GB | planned / anon | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['passes'][0]} | {r['planned'] / 1e9:.3f} | {r['peak_anon'] / 1e9:.3f} | "
            f"{r['peak_rss'] / 1e9:.3f} | {r['planned'] / r['peak_anon']:.2f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
