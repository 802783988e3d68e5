"""`moemerge run`: stage 1, stage 2 and diagnose in one go, with the headline in the model card.

Outputs, for `-o OUT`: the stage-1 model in `OUT.stage1` (or the existing stage-1 checkpoint given
with `--stage1`, e.g. one mergekit wrote), the calibrated model in `OUT`, its report in
`OUT/report`, and the report's headline table in `OUT/README.md`. Without a `calibrate` section
the stage-1 model is written to `OUT` directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.runner import Domain, calibrate
from moemerge.config import load_recipe
from moemerge.diagnose.evaluate import diagnose
from moemerge.diagnose.options import DiagnoseOptions
from moemerge.diagnose.report import headline_table
from moemerge.pipeline.stage1 import merge_checkpoints


def run_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    stage1: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run every stage the recipe asks for; returns the final model folder."""
    recipe = load_recipe(recipe_path)
    out_dir = Path(out_dir)
    if recipe.calibrate is None:
        if stage1 is not None:
            raise ValueError(f"{recipe_path}: --stage1 given but the recipe has no calibrate section")
        return merge_checkpoints(recipe_path, out_dir, overwrite=overwrite, progress=progress)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: output exists; pass --overwrite to replace it")
    if stage1 is None:
        stage1 = str(
            merge_checkpoints(
                recipe_path, out_dir.parent / f"{out_dir.name}.stage1", overwrite=overwrite, progress=progress
            )
        )
    section = recipe.calibrate
    options = CalibrationOptions.model_validate(section.model_dump(exclude={"domains"}))
    domains = [Domain(source, tuple(files)) for source, files in section.domains.items()]
    calibrated = calibrate(stage1, domains, out_dir, options, overwrite=overwrite, progress=progress)
    if options.data.heldout and int(os.environ.get("RANK", "0")) == 0:  # under torchrun diagnose runs on rank 0 only
        _diagnose_into(calibrated, stage1, domains, options, progress)
    return calibrated


def _diagnose_into(
    model: Path, stage1: str, domains: list[Domain], options: CalibrationOptions, progress: bool
) -> None:
    """Report stage 1 vs calibrated (plus oracle routers) into MODEL/report; headline into the card."""
    diagnose_options = DiagnoseOptions(
        data=options.data,
        batch_tokens=options.batch_tokens,
        forward_dtype=options.forward_dtype,
        device=options.device,
        stage1=stage1,
        oracle_routers=True,
    )
    report = diagnose([stage1, str(model)], domains, model / "report", diagnose_options, progress=progress)
    card = model / "README.md"
    text = card.read_text()
    marker = "## Recipe"
    results = "## Results (held-out text; details in report/report.md)\n\n" + headline_table(report).rstrip() + "\n\n"
    card.write_text(text.replace(marker, results + marker, 1) if marker in text else text + "\n" + results)
