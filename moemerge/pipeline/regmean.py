"""`merge_method: regmean`: stage 1 by RegMean over every linear layer, from each source's activations.

The per-tensor methods in `merge/methods` see one tensor at a time; RegMean (Jin et al., ICLR 2023)
needs the inputs each source feeds every linear layer on its own text, so it cannot be a kernel.
It runs as two steps, each an existing mechanism:

1. every tensor merged by the per-tensor method named by the parameter `rest` (default `linear`,
   RegMean's own rule); this is what embeddings, norms, the output head and the routers keep (the
   routers follow the recipe's `routers` rule, as with any method);
2. the calibration walk (`moemerge.calibrate`) with `experts: true`, `linear_layers: all` and the
   routers kept: layer by layer, every `nn.Linear` of the decoder layer (attention, dense MLPs,
   shared experts) by classic RegMean over all tokens of each source's forward, and the routed
   experts by routing-aware RegMean (docs/EXPERTS.md), on the recipe's `calibrate.domains` text with
   the `calibrate.regmean` options.

Both steps write into `.OUT.regmean-<recipe hash>` next to OUT, removed on success; a killed run
resumes from it (the step-1 model is reused, the walk replays its finished layers). Routers are not
re-solved here: `moemerge run` does that afterwards with HARC, as for any stage-1 method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.runner import Domain, calibrate, plan_calibration
from moemerge.checkpoint.card import model_card
from moemerge.config import Recipe
from moemerge.merge.driver import merge_per_tensor
from moemerge.merge.plan import MergeError, plan_merge

LOG = logging.getLogger(__name__)

METHOD = "regmean"
REST = "rest"
"""Method-wide parameter naming the per-tensor method for what RegMean does not solve."""
DEFAULT_REST = "linear"


def rest_recipe(recipe: Recipe) -> Recipe:
    """The recipe of step 1: the `rest` method with every other parameter of the regmean recipe."""
    rest = recipe.parameters.get(REST, DEFAULT_REST)
    if not isinstance(rest, str):
        raise MergeError(f"parameters.{REST}: name one per-tensor merge method (e.g. linear), got {rest!r}")
    if rest == METHOD:
        raise MergeError(f"parameters.{REST}: regmean cannot be its own rest method; name a per-tensor method")
    parameters = {k: v for k, v in recipe.parameters.items() if k != REST}
    return recipe.model_copy(update={"merge_method": rest, "parameters": parameters, "calibrate": None})


def regmean_options(recipe: Recipe) -> CalibrationOptions:
    """The walk's options: the recipe's calibrate section with every linear layer solved and the routers kept."""
    section = recipe.calibrate.model_dump(exclude={"domains"})
    section["regmean"]["linear_layers"] = "all"
    return CalibrationOptions.model_validate(section | {"experts": True, "routers": False})


def merge_regmean(
    recipe: Recipe,
    out_dir: Path,
    *,
    overwrite: bool,
    device: str,
    max_shard_bytes: int,
    progress: bool,
    recipe_text: str,
) -> Path:
    """Run both steps into `out_dir` (checked by the caller: not an input, absent unless `overwrite`)."""
    step1 = rest_recipe(recipe)
    options = regmean_options(recipe)
    try:
        plan = plan_merge(step1)  # every header and parameter check before any work
    except MergeError as err:
        if "parameter" not in str(err):
            raise
        raise MergeError(
            f"{err} (regmean passes every parameter but `{REST}` to its rest method {step1.merge_method}; "
            "RegMean's own options go in calibrate.regmean)"
        ) from None
    for reader in plan.readers.values():
        reader.close()
    missing = [s for s in plan.sources if s not in recipe.calibrate.domains]
    if missing:
        raise MergeError(f"calibrate.domains has no calibration text for source {missing[0]}; RegMean needs each one")
    domains = [Domain(source, tuple(recipe.calibrate.domains[source])) for source in plan.sources]

    key = hashlib.sha256(recipe_text.encode() + json.dumps(recipe.model_dump(mode="json")).encode()).hexdigest()
    scratch = out_dir.parent / f".{out_dir.name}.regmean-{key[:12]}"
    rest_model = scratch / "rest"
    # the walk's plan, from the tensors the rest merge will write: a budget it cannot meet stops here
    tokenizer = recipe.tokenizer_model
    plan_calibration(
        plan.reference, domains, options, tokenizer_source=tokenizer, stored_as=step1.output_dtype, progress=progress
    )
    if rest_model.is_dir():  # written atomically, so complete: reused by a resumed run
        LOG.info("%s: reusing the %s merge of an earlier run", rest_model, step1.merge_method)
    else:
        merge_per_tensor(
            step1,
            rest_model,
            overwrite=False,
            device=device,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            recipe_text=recipe_text,
        )
    summary = (
        f"Stage-1 merge of {len(plan.sources)} model(s) with `regmean`: every linear layer of the decoder layers "
        f"merged by RegMean on each source's calibration text (routed experts routing-aware: each source's Gram "
        f"counts the tokens its own router sends to the expert), everything else by `{step1.merge_method}`; "
        f"routers {'merged by it' if recipe.routers == 'merge' else 'copied from ' + recipe.routers}. "
        "No router calibration (stage 2) has been applied."
    )
    card = model_card(recipe=recipe_text, sources=list(plan.sources), base=plan.base, summary=summary)
    calibrated = calibrate(
        str(rest_model),
        domains,
        out_dir,
        options,
        work_dir=scratch / "work",
        overwrite=overwrite,
        progress=progress,
        card=card,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun the ranks share the folder; rank 0 wrote last
        shutil.rmtree(scratch)
    return calibrated
