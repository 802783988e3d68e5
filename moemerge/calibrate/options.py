"""Options of stage 2, kept free of torch so that the CLI builds its flags from them instantly.

`RouterSolveOptions` (one router's solve) and `CalibrationOptions` (the whole layer-by-layer run)
are the `calibrate` section of a recipe and the source of `moemerge calibrate`'s flags.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moemerge.data import DataOptions

PreconditionerName = Literal["auto", "none", "diagonal", "kronecker", "grouped", "block"]


class RouterSolveOptions(BaseModel):
    """How HARC re-fits one router (the ``harc`` section of a recipe).

    The default preconditioner ``auto`` is ``grouped`` for narrow routers (E x d <= 4096) and
    ``kronecker`` otherwise, which is every real model's router width (docs/CALIBRATION.md,
    "Solver", for the measured times; ``benchmarks/harc_cg.py`` and ``benchmarks/harc_trained.py``).
    Both cost about one input Gram (d / (2E) operator passes) to build; ``grouped`` gives every
    expert its own block, which needs fewer iterations and pays where E small d x d blocks are cheap
    to factorise and to apply. ``block`` (exact blocks) costs about d / 2 passes to build, more
    than CG without it at OLMoE sizes. At gamma = 1 only ``block`` converged on the synthetic
    benchmark (10 iterations; the others stalled near 6e-4 after 1000), so use it there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    gamma: float = Field(
        0.9,
        gt=0,
        description="Blend of each domain's curvature operator with its own diagonal: < 1 gives "
        "gamma*A + (1-gamma)*diag(A), > 1 gives A + (gamma-1)*diag(A), 1 is unregularised "
        "(use --preconditioner block there) "
        "(singular; the solution then differs from the start point only outside the null space).",
    )
    init: Literal["merged", "zero", "average"] = Field(
        "merged",
        description="CG start point: the stage-1 merged router, zeros, or the average of the source routers.",
    )
    tol: float = Field(
        1e-6, gt=0, description="Stop when the true relative residual ||b - A w|| / ||b|| is at most this."
    )
    max_iter: int = Field(1000, ge=0, description="Most CG iterations (one pass over all calibration tokens each).")
    preconditioner: PreconditionerName = Field(
        "auto",
        description="CG preconditioner: auto (grouped for routers with E*d <= 4096, else kronecker); none; "
        "diagonal (Jacobi on the exact diagonal, the authors' option); kronecker (per-expert curvature x input "
        "Gram, plus an exact correction for the softmax row-shift directions); grouped (a d x d block per expert "
        "from the Grams of token groups, plus the same correction; E*d^2 numbers, about one Gram to build); "
        "block (exact per-expert d x d blocks plus the same correction; E*d^2 numbers, about d/2 operator passes "
        "to build).",
    )
    dtype: Literal["float32", "float64"] = Field(
        "float32",
        description="Work dtype of the per-batch products and the CG vectors; sums over tokens are float64 either way.",
    )
    batch_size: int = Field(4096, ge=1, description="Tokens per batch in the curvature products.")
    memory_budget_bytes: int | None = Field(
        8 * 2**30,
        ge=0,
        description="Bytes the preconditioner may hold; if the requested one needs more, the best that fits "
        "is used (block, kronecker, diagonal, none) and reported. None: no limit.",
    )


class RegMeanOptions(BaseModel):
    """Routing-aware RegMean of the experts, run in the calibration walk with ``experts: true``
    (the ``regmean`` section of a recipe's ``calibrate``; docs/EXPERTS.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        0.9,
        gt=0,
        le=1,
        description="RegMean's scale of the off-diagonal Gram entries: G_a = alpha G + (1 - alpha) diag(G).",
    )
    min_tokens: int = Field(
        32,
        ge=1,
        description="An expert keeps its stage-1 weights unless some source routes at least this many "
        "calibration tokens to it.",
    )
    variant: Literal["classic", "sequential"] = Field(
        "sequential",
        description="sequential: inputs from the model being calibrated, targets from each source's own outputs "
        "(lower mean KL to the sources in docs/EXPERTS.md; a second, shortened pass per source and layer); "
        "classic: each source's Gram from its own forward (one pass).",
    )
    routing_weight: bool = Field(
        False,
        description="Weight each token of an expert's Gram by its squared routing weight (off: top-k membership).",
    )
    linear_layers: Literal["experts", "all"] = Field(
        "experts",
        description="experts: only routed experts; all: also attention, dense MLPs and shared experts (classic "
        "RegMean with every token); embeddings, norms and lm_head keep stage 1's values.",
    )
    work_dtype: Literal["float32", "float64"] = Field(
        "float32", description="Dtype of the per-batch Gram products; the running sums are float64 either way."
    )
    sums_budget_bytes: int | None = Field(
        8 * 2**30,
        ge=1,
        description="Bytes the running float64 sums of one layer may hold; more experts than fit are done in "
        "groups, each group another (shortened) pass over the sources. None: no limit.",
    )


class CalibrationOptions(BaseModel):
    """How stage 2 runs (the `calibrate` section of a recipe; also `moemerge calibrate`'s flags)."""

    model_config = ConfigDict(extra="forbid")

    experts: bool = Field(
        False,
        description="Before each router, merge the layer's experts by routing-aware RegMean on each source's own "
        "routing and data (options: regmean section / flags; docs/EXPERTS.md).",
    )
    regmean: RegMeanOptions = Field(default_factory=RegMeanOptions)
    routers: bool = Field(
        True,
        description="Re-solve every MoE router by HARC; off keeps the input model's routers (with experts: true, "
        "RegMean only: what stage-1 `merge_method: regmean` runs).",
    )
    harc: RouterSolveOptions = Field(default_factory=RouterSolveOptions)
    data: DataOptions = Field(default_factory=DataOptions)
    batch_tokens: int = Field(8192, ge=1, description="Tokens (padding included) per forward batch.")
    activation_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage dtype of hidden states and router inputs between uses."
    )
    forward_dtype: Literal["float32", "float64"] = Field("float32", description="Dtype the layers run in.")
    device: str = Field("cpu", description="Device of the layer forward passes and the solver (cpu, cuda).")
    max_memory: str | int | None = Field(
        None,
        description="Memory budget per rank, e.g. 64GB (host on cpu, the GPU with cuda) or host=200GB,device=80GB: "
        "forward batch, activation storage dtype, preconditioner and (GPU) where hidden states live are planned "
        "to fit it, or the run stops before any work (docs/SCALING.md); unlimited: plan without a limit. "
        "None: 90 percent of the memory available when the run starts (MemAvailable, the cgroup's limit, the "
        "GPU's free memory), shared by the ranks of a node.",
    )

    @model_validator(mode="before")
    @classmethod
    def _regmean_shorthand(cls, values: object) -> object:
        """`{experts: true, alpha: 0.9}` is short for `{experts: true, regmean: {alpha: 0.9}}` (any RegMean option)."""
        if not isinstance(values, dict):
            return values
        flat = {k: values[k] for k in RegMeanOptions.model_fields if k in values}
        if not flat:
            return values
        nested = values.get("regmean") or {}
        nested = nested.model_dump() if isinstance(nested, RegMeanOptions) else dict(nested)
        both = sorted(set(flat) & set(nested))
        if both:
            raise ValueError(f"{both[0]} is given both at the top level and in regmean; give it once")
        rest = {k: v for k, v in values.items() if k not in flat}
        return rest | {"regmean": nested | flat}

    @model_validator(mode="after")
    def _something_to_solve(self) -> CalibrationOptions:
        if not (self.routers or self.experts):
            raise ValueError("routers and experts are both off: nothing to calibrate")
        return self
