"""Which RegMean variant to default to: classic vs sequential, on small trained specialists and real text.

No real MoE checkpoint can be downloaded here, so the specialists are trained on the spot: a small
OLMoE (d 64, 4 layers, 8 experts, top-2, character tokenizer) is pretrained on a mix of two real
domains, Python source code (the stdlib's own modules) and English prose (pydoc's topic help), then
fine-tuned once per domain. Stage 1 is their average; stage 2 is HARC alone, or HARC after
routing-aware RegMean of the experts (classic, sequential) in the same walk, or with every linear
layer (``linear_layers: all``). Each model is scored on held-out text of each domain (never used for
training or calibration): its loss, and KL(source || model) against the domain's own specialist.

    python benchmarks/experts_quality.py [--out /tmp/experts_quality --steps 400 --finetune 300]
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import shutil
import time
from pathlib import Path

import torch

CODE_MODULES = [
    "json.decoder", "json.encoder", "argparse", "textwrap", "string", "shlex", "csv", "calendar", "fractions",
    "heapq", "bisect", "difflib", "glob", "fnmatch", "tempfile", "pprint", "dataclasses", "functools", "typing",
    "enum", "ipaddress", "statistics", "shutil", "pathlib", "configparser", "gettext", "tokenize", "ast",
]  # fmt: skip

CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    head_dim=16, num_experts=8, num_experts_per_tok=2, vocab_size=128, max_position_embeddings=256,
)  # fmt: skip


def domain_texts(chunk: int) -> dict[str, list[str]]:
    import importlib
    import pydoc_data.topics

    code = "\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)
    prose = "\n\n".join(pydoc_data.topics.topics.values())
    split = {}
    for name, text in (("code", code), ("prose", prose)):
        pieces = [text[i : i + chunk] for i in range(0, len(text) - chunk, chunk)]
        random.Random(0).shuffle(pieces)
        split[name] = pieces
    return split


def train(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int, length: int) -> None:
    g = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = tokenizer([g.choice(texts) for _ in range(16)], return_tensors="pt", padding=True)
        ids = batch["input_ids"][:, :length]
        mask = batch["attention_mask"][:, :length]
        labels = ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / steps)
    model.eval()


def evaluate(model_dir: Path, source_dir: Path, texts: list[str], tokenizer, length: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    loss = kl = count = 0.0
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            batch = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True)
            ids, mask = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
            logq = source(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
            real = mask[:, 1:].bool()
            target = ids[:, 1:]
            loss -= logp.gather(-1, target[..., None])[..., 0][real].sum().item()
            kl += (logq.exp() * (logq - logp)).sum(-1)[real].sum().item()
            count += real.sum().item()
    return {"loss": loss / count, "kl": kl / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/experts_quality")
    parser.add_argument("--steps", type=int, default=400, help="pretraining steps of the base")
    parser.add_argument("--finetune", type=int, default=300, help="fine-tuning steps of each specialist")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="peak learning rate of the fine-tuning")
    parser.add_argument("--length", type=int, default=128, help="tokens per sample")
    parser.add_argument("--calibration", type=int, default=48, help="calibration samples per domain")
    parser.add_argument("--heldout", type=int, default=48, help="held-out samples per domain")
    parser.add_argument("--reuse", action="store_true", help="keep the models already trained in --out")
    parser.add_argument("--only", help="comma-separated words: run only the variants whose label has one")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: OpenMP spin-waits crawl on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from moemerge.architectures.tiny import tiny_model, tiny_tokenizer
    from moemerge.calibrate.runner import CalibrationOptions, Domain, calibrate
    from moemerge.checkpoint.reader import CheckpointReader
    from moemerge.checkpoint.writer import CheckpointWriter
    from moemerge.data import DataOptions

    root = Path(args.out)
    tokenizer = tiny_tokenizer()
    texts = domain_texts(chunk=2 * args.length)
    held, calib, trainset = {}, {}, {}
    for name, pieces in texts.items():
        held[name] = pieces[: args.heldout]
        calib[name] = pieces[args.heldout : args.heldout + args.calibration]
        trainset[name] = pieces[args.heldout + args.calibration :]
    sources = {name: root / name for name in texts}
    if not (args.reuse and (root / "average").is_dir()):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for name in texts:
            (root / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in calib[name]))
        start = time.perf_counter()
        base = tiny_model("olmoe", seed=0, **CONFIG)
        train(base, tokenizer, trainset["code"] + trainset["prose"], args.steps, 3e-3, 0, args.length)
        base.save_pretrained(root / "base")
        for k, name in enumerate(texts):
            model = tiny_model("olmoe", seed=0, **CONFIG)
            model.load_state_dict(base.state_dict())
            train(model, tokenizer, trainset[name], args.finetune, args.finetune_lr, 1 + k, args.length)
            model.save_pretrained(sources[name])
            tokenizer.save_pretrained(sources[name])
        readers = [CheckpointReader(p) for p in sources.values()]
        with CheckpointWriter(root / "average") as writer:
            for tensor_name in readers[0].names():
                writer.add(tensor_name, sum(r.read(tensor_name).double() for r in readers).float() / len(readers))
            writer.copy_support_files(sources["code"])
            writer.finalize()
        print(f"trained base and {len(sources)} specialists in {time.perf_counter() - start:.0f} s")

    domains = [Domain(str(sources[n]), (str(root / f"{n}.jsonl"),)) for n in texts]
    common = dict(data=DataOptions(max_length=args.length), batch_tokens=2048)

    def regmean(**settings) -> CalibrationOptions:
        return CalibrationOptions(experts=True, regmean=settings, **common)

    variants = {
        "stage 1 (average)": None,
        "HARC": CalibrationOptions(**common),
        "RegMean classic + HARC": regmean(variant="classic"),
        "RegMean sequential + HARC": regmean(variant="sequential"),
        "RegMean classic, routing-weighted + HARC": regmean(variant="classic", routing_weight=True),
        "RegMean sequential, routing-weighted + HARC": regmean(variant="sequential", routing_weight=True),
        "RegMean classic, all linears + HARC": regmean(variant="classic", linear_layers="all"),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if any(word in k for word in args.only.split(","))}
    rows = []
    for label, options in variants.items():
        start = time.perf_counter()
        model_dir = root / "average"
        if options is not None:
            out = root / label.replace(" ", "_")
            shutil.rmtree(root / f"{out.name}.work", ignore_errors=True)  # never replay an older run
            model_dir = calibrate(str(root / "average"), domains, out, options, overwrite=True, progress=False)
        scores = {n: evaluate(model_dir, sources[n], held[n], tokenizer, args.length) for n in texts}
        rows.append((label, scores, time.perf_counter() - start))
    own = {n: evaluate(sources[n], sources[n], held[n], tokenizer, args.length) for n in texts}
    names = list(texts)
    print("| model | " + " | ".join(f"{n} loss | {n} KL" for n in names) + " | mean KL |")
    print("|---|" + "---:|---:|" * len(names) + "---:|")
    print("| each domain's own specialist | " + " | ".join(f"{own[n]['loss']:.4f} | 0 " for n in names) + "| 0 |")
    for label, scores, _ in rows:
        cells = " | ".join(f"{scores[n]['loss']:.4f} | {scores[n]['kl']:.4f}" for n in names)
        print(f"| {label} | {cells} | {sum(scores[n]['kl'] for n in names) / len(names):.4f} |")


if __name__ == "__main__":
    main()
