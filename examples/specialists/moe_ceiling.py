"""How much of a merge's loss gap to a specialist lies in the MoE blocks: the swap measurement.

    python examples/specialists/moe_ceiling.py [--family olmoe-wide-full] [--methods linear] [--parts ...] [--json F]

Any method that rewrites only MoE blocks (router calibration such as HARC, routing-aware RegMean of the
experts) leaves attention, norms, embeddings and head as stage 1 merged them. So for a merged model M and
a domain's specialist S, on that domain's held-out text (the demo's split, never calibration text):

- **ceiling** = (L_M - L_{M with S's MoE blocks}) / (L_M - L_S): the share of the gap closed when every
  MoE block (router with its biases, routed and shared experts) of M is replaced by S's own; the best such
  a method could do by recovering S's blocks exactly on S's domain;
- **converse** = (L_{S with M's MoE blocks} - L_S) / (L_M - L_S): the share of the gap that appears when
  only S's MoE blocks are merged. 1 - converse is the share that appears from the weights outside them.

If the gap were all in the MoE blocks both shares would be 1; if it were all outside, both 0. The same ceiling
with another part swapped in instead (`--parts`: attention, embeddings, output head) tells where else the gap
lies; the parts interact, so their shares need not add up to 1. Losses come
from moemerge's `diagnose` (the same held-out tokens and loss as every other row of RESULTS.md); the swapped
checkpoints are written in float32 with plain transformers, so no weight is rounded on the way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moemerge.calibrate.runner import Domain
    from moemerge.data import DataOptions

HERE = Path(__file__).resolve().parent
WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".bin")


def moe_layers(model) -> list[int]:
    """Indices of the decoder layers whose MLP is a routed MoE block (it holds an `experts` module)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.layers")
    found = [i for i, layer in enumerate(layers) if hasattr(getattr(layer, "mlp", None), "experts")]
    if not found:
        raise ValueError(f"{type(model).__name__}: no MoE layer (no decoder layer has mlp.experts)")
    return found


PARTS = {
    "moe": "every MoE block, the layer's whole mlp: router with its biases, routed and shared experts",
    "attention": "every layer's self-attention: projections and their norms",
    "embeddings": "the input embeddings",
    "head": "the output head",
}
"""What can be swapped: `moe` is the measurement's subject, the others tell where else the gap lies."""


def _modules(model, part: str) -> list:
    if part == "moe":
        return [model.model.layers[i].mlp for i in moe_layers(model)]
    if part == "attention":
        return [layer.self_attn for layer in model.model.layers]
    if part == "embeddings":
        return [model.get_input_embeddings()]
    if part == "head":
        return [model.get_output_embeddings()]
    raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS)}")


def swap_parts(target: str | Path, donor: str | Path, out: str | Path, part: str = "moe") -> Path:
    """Write `target` with one part (PARTS) replaced by `donor`'s (float32); `out` appears only when complete.

    With `moe`, dense layers, attention, norms, embeddings and head stay `target`'s.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: output folder exists")
    receiver = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    giver = AutoModelForCausalLM.from_pretrained(donor, dtype=torch.float32)
    if part == "moe" and moe_layers(giver) != moe_layers(receiver):
        raise ValueError(f"{donor}: MoE layers {moe_layers(giver)} differ from {target}'s {moe_layers(receiver)}")
    for index, (mine, theirs) in enumerate(zip(_modules(receiver, part), _modules(giver, part), strict=True)):
        own, given = mine.state_dict(), theirs.state_dict()
        wrong = [k for k in own if k not in given or given[k].shape != own[k].shape]
        if wrong or len(own) != len(given):
            raise ValueError(f"{donor}: {part} module {index} does not match {target}'s (first mismatch: {wrong[:1]})")
        mine.load_state_dict(given)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    receiver.save_pretrained(partial)
    for file in sorted(Path(target).iterdir()):  # tokenizer and other support files, as the target has them
        if file.is_file() and not file.name.endswith(WEIGHT_FILES) and not (partial / file.name).exists():
            shutil.copy(file, partial / file.name)
    partial.rename(out)
    return out


def swap_moe_blocks(target: str | Path, donor: str | Path, out: str | Path) -> Path:
    """`target` with every MoE block replaced by `donor`'s (`swap_parts` with part `moe`)."""
    return swap_parts(target, donor, out, "moe")


def _share(numerator: float, gap: float) -> float:
    return numerator / gap if abs(gap) > 1e-6 else float("nan")


def measure(
    merged: Mapping[str, str | Path],
    domains: Sequence[Domain],
    data: DataOptions,
    work: str | Path,
    *,
    batch_tokens: int = 4096,
    parts: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, dict[str, dict]]:
    """{merged name: {domain: losses and shares}} of the swap measurement, each domain on its held-out text.

    Keys per domain: `merged`, `specialist`, `merged_with_specialist_moe`, `specialist_with_merged_moe` (held-out
    losses), `ceiling` and `converse` (shares of the gap L_merged - L_specialist, see the module docstring).
    `parts` (other PARTS than moe): `parts` -> {part: {merged_with_specialist, ceiling}}, the same ceiling with
    that part swapped in instead. The swapped checkpoints are written under `work` and removed once their
    domain is measured.
    """
    from moemerge.diagnose.evaluate import diagnose
    from moemerge.diagnose.options import DiagnoseOptions

    work = Path(work)
    options = DiagnoseOptions(data=data, batch_tokens=batch_tokens)
    result: dict[str, dict[str, dict[str, float]]] = {name: {} for name in merged}
    for index, domain in enumerate(domains):
        folder = work / f"domain{index}"
        shutil.rmtree(folder, ignore_errors=True)
        models = {}
        for k, (name, path) in enumerate(merged.items()):
            models[name] = str(path)
            models[f"{name} with specialist MoE"] = str(swap_moe_blocks(path, domain.source, folder / f"{k}-in"))
            models[f"specialist with {name} MoE"] = str(swap_moe_blocks(domain.source, path, folder / f"{k}-out"))
            for part in parts:
                models[f"{name} with specialist {part}"] = str(
                    swap_parts(path, domain.source, folder / f"{k}-{part}", part)
                )
        report = diagnose(models, [domain], folder / "report", options, progress=progress)
        label = report.domains[0].name
        own = report.source(label).loss
        for name in merged:
            loss = {
                "merged": report.get(name, label).loss,
                "specialist": own,
                "merged_with_specialist_moe": report.get(f"{name} with specialist MoE", label).loss,
                "specialist_with_merged_moe": report.get(f"specialist with {name} MoE", label).loss,
            }
            gap = loss["merged"] - own
            loss["ceiling"] = _share(loss["merged"] - loss["merged_with_specialist_moe"], gap)
            loss["converse"] = _share(loss["specialist_with_merged_moe"] - own, gap)
            if parts:
                loss["parts"] = {}
                for part in parts:
                    swapped = report.get(f"{name} with specialist {part}", label).loss
                    loss["parts"][part] = {
                        "merged_with_specialist": swapped,
                        "ceiling": _share(loss["merged"] - swapped, gap),
                    }
            result[name][label] = loss
        shutil.rmtree(folder)
    return result


def mean_share(measured: Mapping[str, Mapping], key: str, part: str | None = None) -> float:
    """Mean over domains of one share (`ceiling` or `converse`; of another `part`: its `ceiling`)."""
    values = [entry["parts"][part][key] if part else entry[key] for entry in measured.values()]
    return sum(values) / len(values)


def table(result: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Markdown table: per merged model and domain the four losses and the two shares."""
    lines = [
        "| merged | domain | L merged | L specialist | merged + specialist's MoE | specialist + merged MoE "
        "| ceiling | converse |",
        "|---|---|" + "---:|" * 6,
    ]
    for name, domains in result.items():
        for domain, v in domains.items():
            cells = [v["merged"], v["specialist"], v["merged_with_specialist_moe"], v["specialist_with_merged_moe"]]
            lines.append(
                f"| {name} | {domain} | "
                + " | ".join(f"{x:.4f}" for x in cells)
                + f" | {v['ceiling']:.3f} | {v['converse']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="olmoe-wide-full", help="Folder under checkpoints/ (built by build.py).")
    parser.add_argument("--methods", nargs="+", default=["linear"], help="Stage-1 methods to merge and measure.")
    parser.add_argument(
        "--parts",
        nargs="*",
        default=[p for p in PARTS if p != "moe"],
        choices=[p for p in PARTS if p != "moe"],
        help="Other parts to swap in instead of the MoE blocks, for where else the gap lies.",
    )
    parser.add_argument("--work", type=Path, default=Path("out/moe-ceiling"))
    parser.add_argument("--json", type=Path, help="Write the measurement here (default: WORK/moe_ceiling.json).")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from demo import CALIBRATION, DOMAINS, HELDOUT, MAX_LENGTH, recipe

    from moemerge.calibrate.runner import Domain
    from moemerge.data import DataOptions
    from moemerge.pipeline.stage1 import merge_checkpoints

    root = HERE / "checkpoints" / args.family
    if not (root / "base").is_dir():
        raise SystemExit(f"{root}: no specialists; build them with build.py")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    merged = {}
    for method in args.methods:
        path = args.work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(args.family, method)))
        merged[method] = str(merge_checkpoints(path, args.work / method, progress=False))
    domains = [Domain(str(root / d), (str(HERE / "data" / f"{d}.jsonl"),)) for d in DOMAINS]
    data = DataOptions(heldout=HELDOUT, max_samples=CALIBRATION, max_length=MAX_LENGTH, seed=0)
    result = measure(merged, domains, data, args.work / "swaps", parts=args.parts)
    print(table(result))
    for name, measured in result.items():
        others = ", ".join(f"{part} {mean_share(measured, 'ceiling', part):.3f}" for part in args.parts)
        print(
            f"{args.family} {name}: MoE-block ceiling {mean_share(measured, 'ceiling'):.3f}, "
            f"converse {mean_share(measured, 'converse'):.3f}; other parts swapped in instead: {others or 'none'} "
            "(mean over domains)"
        )
    record = {
        "family": args.family,
        "command": "python examples/specialists/moe_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "parts": {p: PARTS[p] for p in ["moe", *args.parts]},
        "result": result,
    }
    (args.json or args.work / "moe_ceiling.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
