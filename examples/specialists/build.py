"""Build the tiny base and its domain specialists that the demo and the experiment merge.

    python examples/specialists/build.py [--family olmoe glm4_moe olmoe-wide] [--mode esft full] [--out DIR]

Steps (all seeded, CPU, transformers' own classes):

1. **Data** (`prepare_data`): three domains of real text, see DATA.md: CPython's standard library source
   (code), `pydoc_data.topics` (English technical prose) and the CHAMP competition-math problems with
   their written solutions (`pip install champ-dataset`). Each domain is cut into samples of about
   `SAMPLE_CHARS` characters, shuffled with the seed, and split once: the first `EVAL_SAMPLES` samples
   go to `data/<domain>.jsonl` (shipped; moemerge splits them further into calibration and held-out
   text with its own seed), the rest is training text (written to `--work`, not shipped).
2. **Tokenizer**: a byte-level BPE of `VOCAB_SIZE` tokens trained with `tokenizers` on the training text.
3. **Base**: pretrained from scratch on an equal mix of the three domains' training text, in the family's
   `SHAPES` entry (`olmoe-wide`: shaped like real MoE, experts about 85 % of the parameters).
4. **Specialists**, one per domain, from the base, in each mode asked for:
   - `esft` (default; expert-specialised fine-tuning): only the routers and, in each MoE layer, the
     `Shape.esft_experts` experts the base sends most of this domain's training tokens to are trained,
     everything else is frozen. The specialists then move their routers towards different experts,
     which is what makes routing matter when they are merged.
   - `full`: every parameter is trained, as a full fine-tune of a real model would.

Outputs `<out>/checkpoints/<family>/{base,code,prose,math}` for esft and `<out>/checkpoints/<family>-full/`
for full (safetensors, bf16, tokenizer included); with both modes the second folder's `base` is a symlink to
the first's, so both sets start from the same weights.
Rebuilding on the same machine and library versions (one thread) gives bit-identical data, tokenizer
and weights (checked for OLMoE, see DATA.md); other thread counts, CPUs or library versions may round
differently, and the code domain depends on the Python version's standard library. Time on a busy
2-core CPU: 3.5-10 min per family, about 8 min for olmoe-wide with both modes (see DATA.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
DOMAINS = ("code", "prose", "math")
SEED = 0
SAMPLE_CHARS = 1200
EVAL_SAMPLES = 64
VOCAB_SIZE = 4096
SEQ_LEN = 128
BATCH = 8
ESFT_EXPERTS = 3  # experts trained per MoE layer by an ESFT specialist of the 8-expert shapes

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


class Shape(NamedTuple):
    """One family's architecture: transformers' model type, its config sizes, and how many experts ESFT trains.

    (A NamedTuple, not a dataclass: the tests load this file without registering it as a module.)
    """

    model_type: str
    sizes: dict
    esft_experts: int = ESFT_EXPERTS


SHAPES = {
    "olmoe": Shape(
        "olmoe",
        {**SMALL, "intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 1, "norm_topk_prob": False},
    ),
    "glm4_moe": Shape(
        "glm4_moe",
        {
            **SMALL,
            "intermediate_size": 128,
            "moe_intermediate_size": 128,
            "n_routed_experts": 8,
            "num_experts_per_tok": 1,
            "n_shared_experts": 0,
            "first_k_dense_replace": 0,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": False,  # top-1 renormalised would be a constant weight 1: no router gradient
            "routed_scaling_factor": 1.0,
            "partial_rotary_factor": 1.0,
            "num_nextn_predict_layers": 0,
        },
    ),
    # Shaped like real MoE (OLMoE-1B-7B: experts about 90 % of the parameters, 64 experts, top-8): the experts
    # hold about 85 % of the parameters here, against 57 % in the two shapes above whose 4096 x 64 embeddings
    # and head weigh as much as all their experts. Fine-grained experts (32 of width 96, top-4), 6 layers;
    # hidden 48 keeps the embeddings small and the checkpoints about 6 MB each.
    "olmoe-wide": Shape(
        "olmoe",
        {
            **SMALL,
            "hidden_size": 48,
            "num_hidden_layers": 6,
            "head_dim": 12,
            "intermediate_size": 96,
            "num_experts": 32,
            "num_experts_per_tok": 4,
            "norm_topk_prob": False,  # as OLMoE
        },
        esft_experts=8,  # a quarter of the experts, twice top-k
    ),
}


# ---------------------------------------------------------------------------------------------- data


def _chunks(text: str, size: int = SAMPLE_CHARS) -> list[str]:
    """Cut text into pieces of about `size` characters at line ends (one long line is cut hard)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            pieces.append(line[:size])
            line = line[size:]
        if len(current) + len(line) > size and current.strip():
            pieces.append(current)
            current = ""
        current += line
    if current.strip():
        pieces.append(current)
    return [p for p in pieces if len(p.strip()) >= size // 4]


def domain_texts() -> dict[str, list[str]]:
    """Every domain's samples, in a fixed (sorted) order before the seeded shuffle."""
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [c for path in sorted(stdlib.glob("*.py")) for c in _chunks(path.read_text(errors="replace"))]
    prose = [c for key in sorted(pydoc_data.topics.topics) for c in _chunks(pydoc_data.topics.topics[key])]
    try:
        from importlib import resources

        champ = json.loads((resources.files("champ_dataset") / "dataset_files" / "v0.json").read_text())
    except ModuleNotFoundError as err:
        raise SystemExit("the math domain needs the CHAMP data: pip install champ-dataset==1.0.0") from err
    math_docs = []
    for key in sorted(champ["problems"]):
        problem = champ["problems"][key]
        steps = " ".join(step["_text"] for step in problem["solution"]["steps"])
        math_docs.append(f"Problem. {problem['_text']}\nSolution. {steps}\nAnswer. {problem.get('answer', '')}\n")
    for key in sorted(champ["concepts"]):
        math_docs.append(f"Concept. {champ['concepts'][key]['_text']}\n")
    for key in sorted(champ["hints"]):
        math_docs.append(f"Hint. {champ['hints'][key]['_text']}\n")
    maths = _chunks("\n".join(math_docs))
    return {"code": code, "prose": prose, "math": maths}


def prepare_data(work: Path, data_dir: Path) -> dict[str, list[str]]:
    """Split each domain once (seeded): EVAL_SAMPLES to data_dir/<domain>.jsonl, the rest is training text."""
    data_dir.mkdir(parents=True, exist_ok=True)
    train = {}
    for domain, samples in domain_texts().items():
        order = list(range(len(samples)))
        random.Random(f"{SEED}-{domain}").shuffle(order)
        evaluation = [samples[i] for i in order[:EVAL_SAMPLES]]
        train[domain] = [samples[i] for i in order[EVAL_SAMPLES:]]
        (data_dir / f"{domain}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in evaluation))
        print(f"{domain}: {len(samples)} samples, {len(evaluation)} evaluation, {len(train[domain])} training")
    (work / "train.json").write_text(json.dumps(train))
    return train


# ----------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(train: dict[str, list[str]], out: Path):
    """Byte-level BPE on the training text only; saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([t for d in DOMAINS for t in train[d]], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def token_streams(train: dict[str, list[str]], tokenizer) -> dict[str, torch.Tensor]:
    """Each domain's training text as one long stream of ids (documents joined by </s>)."""
    import torch

    streams = {}
    for domain in DOMAINS:
        ids = tokenizer(train[domain], add_special_tokens=False)["input_ids"]
        streams[domain] = torch.tensor([i for doc in ids for i in doc + [tokenizer.eos_token_id]])
    return streams


# -------------------------------------------------------------------------------------------- models


def model_config(family: str, tokenizer):
    from transformers import AutoConfig

    shape = SHAPES[family]
    return AutoConfig.for_model(
        shape.model_type,
        **shape.sizes,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _batch(streams: dict, domains: tuple[str, ...], generator) -> torch.Tensor:
    """BATCH random windows of SEQ_LEN tokens, domains taken in turn."""
    import torch

    rows = []
    for b in range(BATCH):
        stream = streams[domains[b % len(domains)]]
        start = int(torch.randint(0, len(stream) - SEQ_LEN, (1,), generator=generator))
        rows.append(stream[start : start + SEQ_LEN])
    return torch.stack(rows)


def train(model, streams, domains, steps: int, lr: float, seed: int, label: str, grad_masks=None) -> float:
    """AdamW (no weight decay, so frozen entries stay exactly as they were), warmup then cosine decay."""
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    bar = tqdm(range(steps), desc=label, mininterval=5)
    recent = []
    for step in bar:
        ids = _batch(streams, domains, generator)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss  # OLMoE adds its load-balancing loss when output_router_logits is set
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for param, mask in (grad_masks or {}).items():
            if param.grad is not None:
                param.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 25 == 0 or step == steps - 1:
            bar.write(f"{label} step {step:4d} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return sum(recent) / len(recent)


def moe_blocks(model) -> list[tuple[object, object]]:
    """(router module, experts module) of every MoE layer."""
    blocks = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            blocks.append((mlp.gate, mlp.experts))
    return blocks


def expert_load(model, stream, tokens: int = 16384) -> list[torch.Tensor]:
    """Per MoE layer, how many of the first `tokens` training tokens of a domain each expert gets (top-k)."""
    import torch

    counts = []
    hooks = []

    def hook(module, args, output):
        indices = output[-1] if isinstance(output, tuple) else output
        counts.append(torch.bincount(indices.reshape(-1), minlength=module_experts[module]))

    module_experts = {}
    for router, experts in moe_blocks(model):
        module_experts[router] = experts.num_experts
        hooks.append(router.register_forward_hook(hook))
    ids = stream[: (tokens // SEQ_LEN) * SEQ_LEN].reshape(-1, SEQ_LEN)
    with torch.no_grad():
        for chunk in ids.split(32):
            model(input_ids=chunk)
    for h in hooks:
        h.remove()
    n = len(module_experts)
    return [sum(counts[i::n]) for i in range(n)]


def esft_setup(model, load: list, experts_per_layer: int = ESFT_EXPERTS) -> dict:
    """Freeze all but the routers and the `experts_per_layer` most-used experts of each layer; returns grad masks."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    masks = {}
    chosen = []
    for (router, experts), counts in zip(moe_blocks(model), load, strict=True):
        top = torch.topk(counts.float(), experts_per_layer).indices
        chosen.append(sorted(top.tolist()))
        router.weight.requires_grad_(True)
        for param in experts.parameters():  # fused experts: E x ... ; train only the chosen rows
            param.requires_grad_(True)
            mask = torch.zeros_like(param)
            mask[top] = 1.0
            masks[param] = mask
    return {"masks": masks, "experts": chosen}


def parameter_counts(model) -> dict[str, int]:
    """Parameters in total and in the routed experts (the tensors of each MoE layer's experts module)."""
    experts = {id(p) for _, module in moe_blocks(model) for p in module.parameters()}
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "experts": sum(p.numel() for p in model.parameters() if id(p) in experts),
    }


def family_dir(out: Path, family: str, mode: str) -> Path:
    """`checkpoints/<family>` for the ESFT specialists, `checkpoints/<family>-full` for the full fine-tunes."""
    return out / "checkpoints" / (family if mode == "esft" else f"{family}-full")


def build_family(family: str, args, tokenizer, streams) -> None:
    """Pretrain one base, then fine-tune one specialist per domain from it in each of `args.mode`.

    With several modes the base is written once, into the first mode's folder; the other folders get a
    relative symlink `base -> ../<first>/base`, so every set is provably fine-tuned from the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    shape = SHAPES[family]
    roots = {mode: family_dir(args.out, family, mode) for mode in args.mode}
    first = roots[args.mode[0]]
    torch.manual_seed(SEED)
    config = model_config(family, tokenizer)
    if shape.model_type == "olmoe":
        config.output_router_logits = True  # load balancing during pretraining only
        config.router_aux_loss_coef = 0.01
    model = AutoModelForCausalLM.from_config(config)
    counts = parameter_counts(model)
    print(f"{family}: {counts['total'] / 1e6:.2f}M parameters, {counts['experts'] / counts['total']:.1%} in experts")
    start = time.time()
    base_loss = train(model, streams, DOMAINS, args.pretrain_steps, args.pretrain_lr, SEED, f"{family} base")
    base_entry = {"train_loss": base_loss, "seconds": time.time() - start}
    model.config.output_router_logits = False
    _save(model, tokenizer, first / "base")
    for mode, root in roots.items():
        if root != first:
            root.mkdir(parents=True, exist_ok=True)
            if (root / "base").is_symlink() or (root / "base").exists():
                raise SystemExit(f"{root / 'base'}: already there; build into an empty --out")
            (root / "base").symlink_to(Path("..") / first.name / "base", target_is_directory=True)
        log = {"family": family, "mode": mode, "parameters": counts, "base": base_entry}
        if root != first:
            log["base"] = dict(base_entry, shared_with=first.name)
        for k, domain in enumerate(DOMAINS):
            specialist = AutoModelForCausalLM.from_pretrained(first / "base", dtype=torch.float32)
            specialist.config.output_router_logits = False
            masks = None
            entry = {}
            if mode == "esft":
                setup = esft_setup(specialist, expert_load(specialist, streams[domain]), shape.esft_experts)
                masks = setup["masks"]
                entry["experts_trained"] = setup["experts"]
                print(f"{family} {domain}: ESFT experts per layer {setup['experts']}")
            start = time.time()
            entry["train_loss"] = train(
                specialist,
                streams,
                (domain,),
                args.finetune_steps,
                args.finetune_lr,
                SEED + 1 + k,
                f"{family} {mode} {domain}",
                masks,
            )
            entry["seconds"] = time.time() - start
            for p in specialist.parameters():
                p.requires_grad_(True)
            _save(specialist, tokenizer, root / domain)
            log[domain] = entry
        (root / "build_log.json").write_text(json.dumps(log, indent=1) + "\n")


def _save(model, tokenizer, out: Path) -> None:
    import torch

    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=["olmoe", "glm4_moe"], choices=sorted(SHAPES))
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=["esft", "full"],
        default=["esft"],
        help="Specialist sets fine-tuned from one base: esft -> checkpoints/<family>, full -> <family>-full.",
    )
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 was 4x faster than 2 on a busy 2-core CPU)"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    train_text = prepare_data(args.work, args.out / "data")
    tokenizer = train_tokenizer(train_text, args.work / "tokenizer")
    streams = token_streams(train_text, tokenizer)
    for domain in DOMAINS:
        print(f"{domain}: {len(streams[domain])} training tokens")
    for family in args.family:
        build_family(family, args, tokenizer, streams)
    print(f"built in {time.time() - start:.0f} s (python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
