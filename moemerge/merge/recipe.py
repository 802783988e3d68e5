"""The stage-1 part of a recipe: what a per-tensor merge needs, as one pydantic model.

It reads like a mergekit YAML (`merge_method`, `base_model`, `models[].model`,
`models[].parameters`, `parameters`, `dtype`, `tokenizer.source`, per-tensor `filter` values) so a
mergekit recipe is accepted as it is for the methods moemerge has; any key moemerge does not know
is an error naming it (pydantic `extra="forbid"`), never silently ignored. The whole recipe,
with its `calibrate:` section, extends this model one floor up (moemerge/config.py), so that
stage 1 never imports stage 2.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moemerge.checkpoint.hub import model_ref_text

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

    model: str = Field(
        description="A Hugging Face model folder (safetensors weights), or a Hub id org/name[@revision]."
    )
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    _mergekit_mapping = field_validator("model", mode="before")(model_ref_text)


class TokenizerSource(_Strict):
    source: str = Field(default="base", description="'base', or the path of the model whose tokenizer to copy.")


class MergeRecipe(_Strict):
    """A stage-1 merge of K fine-tuned MoE checkpoints of one base (mergekit-compatible)."""

    merge_method: str = Field(
        description="Stage-1 method, e.g. linear, task_arithmetic, ties, dare_ties, wudi; regmean also reads "
        "calibrate.domains (docs/EXPERTS.md)."
    )
    base_model: str | None = Field(
        default=None, description="The common base model (theta_0): a folder, or a Hub id org/name[@revision]."
    )
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
    routers: str = Field(
        default="merge",
        description="How stage 1 treats router tensors: 'merge' like any tensor, 'base', or a source model path.",
    )

    _mergekit_mapping = field_validator("base_model", mode="before")(model_ref_text)

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
    def _routers_source_known(self) -> MergeRecipe:
        allowed = {"merge", "base", *(m.model for m in self.models)}
        if self.routers not in allowed:
            raise ValueError(f"routers must be 'merge', 'base' or one of the source models, got {self.routers!r}")
        if self.routers == "base" and self.base_model is None:
            raise ValueError("routers: 'base' needs a base_model")
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
