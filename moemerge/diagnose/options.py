"""Options of `moemerge diagnose` (one pydantic model, the single source of its flags; no torch import)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moemerge.data import DataOptions


class DiagnoseOptions(BaseModel):
    """How candidates are evaluated against the sources on each domain's held-out text."""

    model_config = ConfigDict(extra="forbid")

    data: DataOptions = Field(default_factory=DataOptions)
    batch_tokens: int = Field(8192, ge=1, description="Tokens (padding included) per forward batch.")
    forward_dtype: Literal["float32", "float64"] = Field("float32", description="Dtype the layers run in.")
    device: str = Field("cpu", description="Device of the layer forward passes (cpu, cuda).")
    stage1: str | None = Field(
        None,
        description=(
            "The candidate that is the stage-1 merge, for the fraction of the stage-1-to-source loss gap "
            "each candidate recovers: a --model path or its report name. Unset: the first --model."
        ),
    )
    oracle_routers: bool = Field(
        False,
        description=(
            "Also evaluate each candidate on each source's domain with that source's routers swapped in "
            "(weight, bias and selection bias of every MoE layer): the best any router calibration could do."
        ),
    )
    oracle_for: list[str] | None = Field(
        None,
        description=(
            "With oracle_routers: only these candidates (a --model path or its report name; repeatable) get "
            "oracle rows. A model that differs from another only in its routers (HARC's output vs its stage 1) "
            "has the same oracle rows, so one of them is enough. Unset: every candidate."
        ),
    )
