"""How much of a merge's loss gap to a specialist lies in the MoE blocks: the swap measurement.

    python examples/specialists/moe_ceiling.py [--family olmoe-wide-full] [--methods linear] [--work DIR]

Any method that rewrites only MoE blocks (router calibration such as HARC, routing-aware RegMean of the
experts) leaves attention, norms, embeddings and head as stage 1 merged them. So for a merged model M and
a domain's specialist S, on that domain's held-out text (the demo's split, never calibration text):

- **ceiling** = (L_M - L_{M with S's MoE blocks}) / (L_M - L_S): the share of the gap closed when every
  MoE block (router with its biases, routed and shared experts) of M is replaced by S's own; the best such
  a method could do by recovering S's blocks exactly on S's domain;
- **converse** = (L_{S with M's MoE blocks} - L_S) / (L_M - L_S): the share of the gap that appears when
  only S's MoE blocks are merged. 1 - converse is the share that appears from the weights outside them.

If the gap were all in the MoE blocks both shares would be 1; if it were all outside, both 0. Losses come
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


def swap_moe_blocks(target: str | Path, donor: str | Path, out: str | Path) -> Path:
    """Write `target` with every MoE block replaced by `donor`'s (float32); `out` appears only when complete.

    A block is the layer's whole `mlp` module: router weight and biases (the selection bias included),
    routed experts and any shared experts. Dense layers, attention, norms, embeddings and head stay `target`'s.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: output folder exists")
    receiver = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    giver = AutoModelForCausalLM.from_pretrained(donor, dtype=torch.float32)
    layers = moe_layers(receiver)
    if moe_layers(giver) != layers:
        raise ValueError(f"{donor}: MoE layers {moe_layers(giver)} differ from {target}'s {layers}")
    for i in layers:
        mine, theirs = receiver.model.layers[i].mlp.state_dict(), giver.model.layers[i].mlp.state_dict()
        wrong = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
        if wrong or len(mine) != len(theirs):
            raise ValueError(f"{donor}: MoE block of layer {i} does not match {target}'s (first mismatch: {wrong[:1]})")
        receiver.model.layers[i].mlp.load_state_dict(theirs)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    receiver.save_pretrained(partial)
    for file in sorted(Path(target).iterdir()):  # tokenizer and other support files, as the target has them
        if file.is_file() and not file.name.endswith(WEIGHT_FILES) and not (partial / file.name).exists():
            shutil.copy(file, partial / file.name)
    partial.rename(out)
    return out


def _share(numerator: float, gap: float) -> float:
    return numerator / gap if abs(gap) > 1e-6 else float("nan")


def measure(
    merged: Mapping[str, str | Path],
    domains: Sequence[Domain],
    data: DataOptions,
    work: str | Path,
    *,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """{merged name: {domain: losses and shares}} of the swap measurement, each domain on its held-out text.

    Keys per domain: `merged`, `specialist`, `merged_with_specialist_moe`, `specialist_with_merged_moe` (held-out
    losses), `ceiling` and `converse` (shares of the gap L_merged - L_specialist, see the module docstring).
    The swapped checkpoints are written under `work` and removed once their domain is measured.
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
            result[name][label] = loss
        shutil.rmtree(folder)
    return result


def mean_share(measured: Mapping[str, Mapping[str, float]], key: str) -> float:
    """Mean over domains of one share (`ceiling` or `converse`) of one merged model's measurement."""
    values = [entry[key] for entry in measured.values()]
    return sum(values) / len(values)


def table(result: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
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
    parser.add_argument("--work", type=Path, default=Path("out/moe-ceiling"))
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
    result = measure(merged, domains, data, args.work / "swaps")
    print(table(result))
    for name, measured in result.items():
        print(
            f"{args.family} {name}: MoE-block ceiling {mean_share(measured, 'ceiling'):.3f}, "
            f"converse {mean_share(measured, 'converse'):.3f} (mean over domains)"
        )
    (args.work / "moe_ceiling.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
