"""The recipe: one pydantic model of the YAML file, the single source of CLI options and help text.

The stage-1 part reads like a mergekit YAML (`merge_method`, `base_model`, `models[].model`,
`models[].parameters`, `parameters`, `dtype`, `tokenizer.source`, per-tensor `filter` values) so a
mergekit recipe is accepted as it is for the methods moemerge has; any key moemerge does not know
is an error naming it (pydantic `extra="forbid"`), never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64", "half": "float16"}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ConditionalValue(_Strict):
    """mergekit's per-tensor parameter: `value` applies to tensors whose name contains `filter`."""

    value: Any
    filter: str | None = None


ParameterValue = float | int | bool | str | list[ConditionalValue]


def resolve_parameters(parameters: dict[str, ParameterValue], tensor_name: str) -> dict[str, Any]:
    """The scalar parameters for one tensor: the first conditional entry whose filter matches wins."""
    resolved = {}
    for key, value in parameters.items():
        if isinstance(value, list):
            match = next((c for c in value if c.filter is None or c.filter in tensor_name), None)
            if match is not None:
                resolved[key] = match.value
        else:
            resolved[key] = value
    return resolved


class ModelEntry(_Strict):
    """One source model of the merge and its per-source parameters (`weight`, `density`, ...)."""

    model: str = Field(description="Path of a Hugging Face model folder (safetensors weights).")
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


class TokenizerSource(_Strict):
    source: str = Field(default="base", description="'base', or the path of the model whose tokenizer to copy.")


def _calibration_options() -> type[BaseModel]:
    from moemerge.calibrate.options import CalibrationOptions

    return CalibrationOptions


class CalibrateSection(_calibration_options()):  # type: ignore[misc]
    """Stage 2 in a recipe: the calibration text of each source, and the HARC options."""

    domains: dict[str, list[str]] = Field(
        description="Source model path -> its domain's calibration files (.jsonl with messages/text, or .txt)."
    )


class Recipe(_Strict):
    """A stage-1 merge of K fine-tuned MoE checkpoints of one base (mergekit-compatible)."""

    merge_method: str = Field(
        description="Stage-1 method, e.g. linear, task_arithmetic, ties, dare_ties, wudi; regmean also reads "
        "calibrate.domains (docs/EXPERTS.md)."
    )
    base_model: str | None = Field(default=None, description="Path of the common base model (theta_0).")
    models: list[ModelEntry] = Field(min_length=1, description="The fine-tuned source models.")
    parameters: dict[str, ParameterValue] = Field(default_factory=dict, description="Method-wide parameters.")
    dtype: str = Field(default="bfloat16", description="Output dtype: bfloat16, float16 or float32.")
    out_dtype: str | None = Field(default=None, description="mergekit alias of dtype; wins when both are given.")
    tokenizer: TokenizerSource | None = Field(default=None, description="Which model's tokenizer to copy.")
    tokenizer_source: str | None = Field(default=None, description="mergekit's older spelling of tokenizer.source.")
    work_dtype: Literal["float32", "float64"] = Field(
        default="float32", description="Dtype every tensor is merged in (never bf16)."
    )
    seed: int = Field(default=0, description="Seed of random methods (DARE, DELLA): masks depend on seed and name.")
    calibrate: CalibrateSection | None = Field(default=None, description="Stage 2 (HARC); omit to merge only.")
    routers: str = Field(
        default="merge",
        description="How stage 1 treats router tensors: 'merge' like any tensor, 'base', or a source model path.",
    )

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = _DTYPE_ALIASES.get(value, value)
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _routers_source_known(self) -> Recipe:
        allowed = {"merge", "base", *(m.model for m in self.models)}
        if self.routers not in allowed:
            raise ValueError(f"routers must be 'merge', 'base' or one of the source models, got {self.routers!r}")
        if self.routers == "base" and self.base_model is None:
            raise ValueError("routers: 'base' needs a base_model")
        return self

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

    @property
    def output_dtype(self) -> str:
        return self.out_dtype or self.dtype

    @property
    def tokenizer_model(self) -> str:
        """The model folder whose config, tokenizer and chat template the output gets."""
        source = self.tokenizer.source if self.tokenizer else (self.tokenizer_source or "base")
        if source == "base":
            return self.base_model or self.models[0].model
        return source

    @property
    def source_paths(self) -> list[str]:
        return [m.model for m in self.models]


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; relative model paths are resolved against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise RecipeError(f"{path}: recipe file not found") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        kind = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise RecipeError(f"{path}: field {field}: {kind} ({len(err.errors())} error(s))") from err
    return _resolve_paths(recipe, path.parent)


def _resolve_paths(recipe: Recipe, root: Path) -> Recipe:
    def resolve(p: str | None) -> str | None:
        if p is None or p in ("base", "merge"):
            return p
        return str((root / p).resolve()) if not Path(p).is_absolute() and (root / p).exists() else p

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
                        resolve(source): [resolve(f) for f in files]
                        for source, files in recipe.calibrate.domains.items()
                    }
                }
            ),
        }
    )
