"""The recipe: one pydantic model of the YAML file, the single source of CLI options and help text.

The stage-1 fields (mergekit's) are `moemerge.merge.recipe.MergeRecipe`; this model adds the
`calibrate:` section (stage 2's options and each source's text) and the checks that join the two.
It sits above both stages, next to the compositions that run them (moemerge/pipeline).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from moemerge.calibrate.options import CalibrationOptions
from moemerge.checkpoint.hub import resolve_models
from moemerge.data import DataSpec, parse_data_source
from moemerge.merge.recipe import MergeRecipe, RecipeError


class CalibrateSection(CalibrationOptions):
    """Stage 2 in a recipe: the calibration text of each source, and the HARC options."""

    domains: dict[str, list[str | DataSpec]] = Field(
        description="Source model (folder or Hub id) -> its domain's data: files (.jsonl, .json, .txt, .parquet, "
        ".csv) or Hub datasets ('org/name:train[:2000]', or a mapping with dataset, config, split, sample)."
    )


class Recipe(MergeRecipe):
    """A stage-1 merge plus, optionally, its stage-2 calibration (`calibrate:`)."""

    calibrate: CalibrateSection | None = Field(default=None, description="Stage 2 (HARC); omit to merge only.")

    @model_validator(mode="after")
    def _calibration_domains_are_sources(self) -> Recipe:
        if self.calibrate is not None:
            unknown = sorted(set(self.calibrate.domains) - set(self.source_paths))
            if unknown:
                raise ValueError(f"calibrate.domains names {unknown[0]!r}, which is not one of models[].model")
        return self

    @model_validator(mode="after")
    def _regmean_has_text(self) -> Recipe:
        if self.merge_method == "regmean" and self.calibrate is None:
            raise ValueError(
                "merge_method regmean needs each source's calibration text: add calibrate.domains "
                "(source model -> its domain's files); RegMean's options go in calibrate.regmean"
            )
        return self


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; relative model paths are resolved against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise RecipeError(f"{path}: recipe file not found") from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except (yaml.YAMLError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
        raise RecipeError(f"{path}: invalid YAML ({' '.join(str(err).split()) or type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    if _expands_beyond(raw, 1000 + 10 * path.stat().st_size):
        raise RecipeError(f"{path}: its YAML aliases expand to far more values than the file holds")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        kind = "unknown key" if first["type"] == "extra_forbidden" else " ".join(first["msg"].split())
        raise RecipeError(f"{path}: field {field}: {kind} ({len(err.errors())} error(s))") from err
    try:
        return _resolve_paths(recipe, path.parent)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None


def _expands_beyond(value: object, limit: int) -> bool:
    """Whether `value` has more than `limit` nodes counting every alias use (a few YAML lines can alias billions)."""
    stack, count = [value], 0
    while stack:
        count += 1
        if count > limit:
            return True
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _resolve_paths(recipe: Recipe, root: Path) -> Recipe:
    """Relative paths against the recipe's folder; Hub model ids downloaded (after one plan of all models)."""

    def local(p: str | None) -> str | None:
        if p is None or p in ("base", "merge"):
            return p
        return str((root / p).resolve()) if not Path(p).is_absolute() and (root / p).exists() else p

    def data(entry: str | DataSpec, source: str) -> DataSpec:
        try:
            return parse_data_source(entry.under(root) if isinstance(entry, DataSpec) else local(entry))
        except ValueError as err:
            raise RecipeError(f"calibrate.domains[{source}]: {err}") from None

    tokenizer = recipe.tokenizer.source if recipe.tokenizer else None
    domains = list(recipe.calibrate.domains) if recipe.calibrate else []
    named = [recipe.base_model, *recipe.source_paths, recipe.routers, tokenizer, recipe.tokenizer_source, *domains]
    fetched = resolve_models(local(p) for p in named if p not in (None, "base", "merge"))

    def resolve(p: str | None) -> str | None:
        return fetched.get(local(p), local(p)) if p is not None else None

    return recipe.model_copy(
        update={
            "base_model": resolve(recipe.base_model),
            "models": [m.model_copy(update={"model": resolve(m.model)}) for m in recipe.models],
            "routers": resolve(recipe.routers),
            "tokenizer": recipe.tokenizer
            and recipe.tokenizer.model_copy(update={"source": resolve(recipe.tokenizer.source)}),
            "tokenizer_source": resolve(recipe.tokenizer_source),
            "calibrate": recipe.calibrate
            and recipe.calibrate.model_copy(
                update={
                    "domains": {
                        resolve(source): [data(f, source) for f in files]
                        for source, files in recipe.calibrate.domains.items()
                    }
                }
            ),
        }
    )
