"""`moemerge run`: stage 1, stage 2 and diagnose in one go, with the headline in the model card.

Outputs, for `-o OUT`: the stage-1 model in `OUT.stage1` (or the existing stage-1 checkpoint given
with `--stage1`, e.g. one mergekit wrote), the calibrated model in `OUT`, its report in
`OUT/report`, and the report's headline table in `OUT/README.md`. Without a `calibrate` section
the stage-1 model is written to `OUT` directly.

`OUT` appears only complete, report and card included: the calibrated model is written into a
hidden folder beside it (`.OUT.run-<key of the inputs>`), diagnosed there, then moved into place.
A killed run resumes when run again: stage 1 from its finished shards or its finished output (the
run notes in `OUT.work` which inputs that `OUT.stage1` was made from), the walk from the layers in
`OUT.work`, and a finished calibrated model is only diagnosed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.runner import Domain, calibrate, plan_calibration
from moemerge.checkpoint.lock import folder_lock
from moemerge.checkpoint.reader import CheckpointError, folder_stamp
from moemerge.checkpoint.writer import disk_errors
from moemerge.config import Recipe, load_recipe
from moemerge.diagnose.evaluate import evaluate
from moemerge.diagnose.options import DiagnoseOptions
from moemerge.diagnose.output import write_report
from moemerge.diagnose.report import Report, headline_table
from moemerge.pipeline.stage1 import merge_checkpoints

STAGE1_KEY = "stage1.key"
"""File in `OUT.work` naming the inputs `OUT.stage1` is (being) made from, so that a rerun may reuse it."""


def _inputs_key(recipe_text: str, folders: list[str], files: list[str]) -> str:
    """A hash of the recipe, of every input folder's file stamps and of the calibration files' stamps."""
    stamps = [folder_stamp(f) for f in folders]
    stamps += [[f, *((Path(f).stat().st_size, Path(f).stat().st_mtime_ns) if Path(f).is_file() else ())] for f in files]
    return hashlib.sha256(json.dumps([recipe_text, stamps]).encode()).hexdigest()


def run_recipe(
    recipe_path: str | Path,
    out_dir: str | Path,
    *,
    stage1: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_memory: str | None = None,
) -> Path:
    """Run every stage the recipe asks for; returns the final model folder.

    `max_memory` (``--max-memory``) replaces the recipe's ``calibrate.max_memory`` for the walk of stage 2
    and of a stage-1 ``regmean``.
    """
    recipe = load_recipe(recipe_path)
    out_dir = Path(out_dir)
    if recipe.calibrate is None:
        if stage1 is not None:
            raise ValueError(f"{recipe_path}: --stage1 given but the recipe has no calibrate section")
        return merge_checkpoints(recipe_path, out_dir, overwrite=overwrite, progress=progress, max_memory=max_memory)
    with folder_lock(out_dir):
        if out_dir.exists() and not overwrite:
            raise ValueError(f"{out_dir}: output exists; pass --overwrite to replace it")
        recipe_text = Path(recipe_path).read_text()
        work = out_dir.parent / f"{out_dir.name}.work"
        section = recipe.calibrate
        options = CalibrationOptions.model_validate(section.model_dump(exclude={"domains"}))
        if max_memory is not None:
            options = options.model_copy(update={"max_memory": max_memory})
        domains = [Domain(source, tuple(files)) for source, files in section.domains.items()]
        if stage1 is None:
            # stage 2's plan, from the tensors stage 1 will write: a budget it cannot meet stops the run here
            plan_calibration(
                recipe.base_model or recipe.source_paths[0],
                domains,
                options,
                tokenizer_source=recipe.tokenizer_model,
                stored_as=recipe.output_dtype,
                progress=progress,
            )
            stage1 = str(_stage1(recipe_path, recipe, recipe_text, out_dir, work, overwrite, progress, max_memory))
        files = [str(f) for d in domains for f in d.files]
        key = _inputs_key(recipe_text, [stage1, *(d.source for d in domains)], files)
        scratch = out_dir.parent / f".{out_dir.name}.run-{key[:16]}"
        staged = scratch / out_dir.name
        writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 diagnoses and moves into place
        if writer:
            for other in out_dir.parent.glob(f".{out_dir.name}.run-*"):
                if other != scratch:  # a killed run of other inputs
                    shutil.rmtree(other, ignore_errors=True)
        if not staged.exists():  # written atomically: present means complete
            try:
                calibrate(stage1, domains, staged, options, work_dir=work, progress=progress)
            except CheckpointError as err:  # name the output the user asked for, not the hidden folder
                raise CheckpointError(str(err).replace(str(staged), str(out_dir))) from None
        if not writer:
            return out_dir
        if options.data.heldout:
            with disk_errors(out_dir):
                _diagnose_into(staged, out_dir, stage1, domains, options, progress)
        _move_into_place(staged, out_dir)
        shutil.rmtree(scratch)
        return out_dir


def _stage1(
    recipe_path: str | Path,
    recipe: Recipe,
    text: str,
    out_dir: Path,
    work: Path,
    overwrite: bool,
    progress: bool,
    max_memory: str | None = None,
) -> Path:
    """`OUT.stage1`: merged now, or kept from a killed run of the same inputs (its key in `OUT.work`)."""
    stage1 = out_dir.parent / f"{out_dir.name}.stage1"
    inputs = [*([recipe.base_model] if recipe.base_model else []), *recipe.source_paths, recipe.tokenizer_model]
    key = _inputs_key(text, list(dict.fromkeys(inputs)), [])
    marker = work / STAGE1_KEY
    with folder_lock(stage1):  # held while reused too, which also takes over the lock file a killed stage 1 left
        if stage1.exists() and not overwrite and marker.is_file() and marker.read_text() == key:
            return stage1
        if int(os.environ.get("RANK", "0")) == 0:
            with disk_errors(work):
                work.mkdir(parents=True, exist_ok=True)
                marker.write_text(key)  # before the merge: whenever OUT.stage1 appears, it is of these inputs
        return merge_checkpoints(recipe_path, stage1, overwrite=overwrite, progress=progress, max_memory=max_memory)


def _move_into_place(staged: Path, out_dir: Path) -> None:
    """`out_dir` = `staged`, the previous `out_dir` (with --overwrite) removed only after the move."""
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"  # restored by folder_lock if killed here
    if out_dir.exists():
        out_dir.rename(old)
    staged.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _diagnose_into(
    model: Path, final: Path, stage1: str, domains: list[Domain], options: CalibrationOptions, progress: bool
) -> None:
    """Report stage 1 vs calibrated (plus oracle routers) into MODEL/report; headline into the card.

    `model` is the calibrated model where it is written, `final` where it will be moved: the
    report names the model by its final path.
    """
    diagnose_options = DiagnoseOptions(
        data=options.data,
        batch_tokens=options.batch_tokens,
        forward_dtype=options.forward_dtype,
        device=options.device,
        stage1=stage1,
        oracle_routers=True,
        # HARC changes only routers, so the calibrated model's oracle rows equal stage 1's unless experts changed too
        oracle_for=[stage1, str(model)] if options.experts else [stage1],
    )
    names = [Path(stage1).name, final.name]
    if names[0] == names[1]:
        names = [str(Path(stage1).resolve()), str(final.resolve())]
    report = evaluate(dict(zip(names, [stage1, str(model)], strict=True)), domains, diagnose_options, progress=progress)
    where, moved = (json.dumps(str(p))[1:-1] for p in (model, final))
    report = Report.from_dict(json.loads(json.dumps(report.to_dict()).replace(where, moved)))
    for unfinished in model.glob(".report.*"):  # a killed diagnose's temporary report folder
        shutil.rmtree(unfinished)
    write_report(report, model / "report", overwrite=True)  # a resumed run diagnoses again
    card = model / "README.md"
    heading, marker = "## Results (held-out text; details in report/report.md)", "## Recipe"
    text = card.read_text()
    if heading in text:  # written by a run killed before the move: replaced, not repeated
        before, _, after = text.partition(heading)
        text = before + (marker + after.partition(marker)[2] if marker in after else "")
    results = heading + "\n\n" + headline_table(report).rstrip() + "\n\n"
    card.write_text(text.replace(marker, results + marker, 1) if marker in text else text + "\n" + results)
