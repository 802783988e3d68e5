"""What moemerge must be told about each MoE family: the facts a meta-device model cannot reveal.

Everything else (which layers are MoE, router tensor names on disk, experts, top-k, router bias)
is derived from the transformers model built on the meta device, in `layout.py`. A record here
states only:

- the router kind, i.e. how logits become routing (it fixes the curvature HARC must use), read
  off each family's router `forward` in transformers 5;
- the name of the selection bias (a per-expert bias added to the scores only to *choose* experts,
  e.g. DeepSeek-V3's `e_score_correction_bias`) if the family has one; it lives on the router
  module or on the MoE block that calls the router;
- tensors that look like routers but are not (Qwen2-MoE's 1 x d `shared_expert_gate`).

A family that transformers ships but moemerge does not support is listed in `UNSUPPORTED` with the
reason; docs/ARCHITECTURES.md is generated from both tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RouterKind(StrEnum):
    """How a router turns logits z = W x (+ b) into expert choices and weights."""

    SOFTMAX = "softmax"
    """softmax over all experts, then top-k (renormalised over the k or not): OLMoE, Qwen, Mixtral."""

    TOPK_SOFTMAX = "topk_softmax"
    """top-k on the logits, then softmax over the k chosen: GPT-OSS, GraniteMoE."""

    SIGMOID = "sigmoid"
    """independent sigmoid per expert, top-k on sigmoid + selection bias: DeepSeek-V3, GLM-4.5."""


@dataclass(frozen=True)
class FamilyRecord:
    """The non-derivable facts about one MoE family (one transformers `model_type`)."""

    model_type: str
    router_kind: RouterKind
    selection_bias: str | None = None
    lookalikes: tuple[str, ...] = ()


_S, _T, _G = RouterKind.SOFTMAX, RouterKind.TOPK_SOFTMAX, RouterKind.SIGMOID
_BIAS = "e_score_correction_bias"

FAMILIES: dict[str, FamilyRecord] = {
    r.model_type: r
    for r in (
        FamilyRecord("olmoe", _S),
        FamilyRecord("flex_olmo", _S),
        FamilyRecord("qwen2_moe", _S, lookalikes=("shared_expert_gate",)),
        FamilyRecord("qwen3_moe", _S),
        FamilyRecord("mixtral", _S),
        FamilyRecord("minimax", _S),
        FamilyRecord("mellum", _S),
        FamilyRecord("lara_mini", _S),
        FamilyRecord("deepseek_v2", _S),
        FamilyRecord("ernie4_5_moe", _S, selection_bias=_BIAS),
        FamilyRecord("gpt_oss", _T),
        FamilyRecord("granitemoe", _T),
        FamilyRecord("granitemoe_swa", _T),
        FamilyRecord("granitemoeshared", _T),
        FamilyRecord("deepseek_v3", _G, selection_bias=_BIAS),
        FamilyRecord("deepseek_v32", _G, selection_bias=_BIAS),
        FamilyRecord("glm4_moe", _G, selection_bias=_BIAS),
        FamilyRecord("glm4_moe_lite", _G, selection_bias=_BIAS),
        FamilyRecord("dots1", _G, selection_bias=_BIAS),
        FamilyRecord("exaone_moe", _G, selection_bias=_BIAS),
        FamilyRecord("solar_open", _G, selection_bias=_BIAS),
        FamilyRecord("mimo_v2_flash", _G, selection_bias=_BIAS),
        FamilyRecord("kolibri1", _G, selection_bias=_BIAS),
        FamilyRecord("minimax_m2", _G, selection_bias=_BIAS),
        FamilyRecord("hy_v3", _G, selection_bias=_BIAS),
        FamilyRecord("afmoe", _G, selection_bias="expert_bias"),
        FamilyRecord("flint", _G),
    )
}

_HYBRID = (
    "hybrid model with recurrent (Mamba / linear-attention) layers: the layer-by-layer runner "
    "does not yet carry their recurrent state, so calibration is not verified"
)
_NO_TINY = "no tiny model of this family could be built from its config here, so nothing is verified"

UNSUPPORTED: dict[str, str] = {
    "phimoe": "SparseMixer routing (a sampled two-step top-2), not a softmax or sigmoid over logits",
    "llama4": "top-k on raw logits then sigmoid of the chosen; multimodal wrapper; curvature not derived",
    "cohere2_moe": "router kind depends on `expert_selection_fn` (sigmoid after top-k not derived)",
    "laguna": "tanh soft-capped router logits: the curvature must include the soft-cap; not derived",
    "longcat_flash": "zero-computation experts beside the routed ones; " + _NO_TINY,
    "zaya": "the router is an MLP (ZayaRouterMLP), not a linear map; HARC solves linear routers",
    "deepseek_v4": "hash routers (token-id lookup tables) in the first layers; no weight to calibrate",
    "dbrx": "fused attention config layout; " + _NO_TINY,
    "jamba": _HYBRID,
    "qwen3_next": _HYBRID,
    "granitemoehybrid": _HYBRID,
    "nemotron_h": _HYBRID,
    "lfm2_moe": _HYBRID,
    "kimi_linear": _HYBRID,
    "bailing_hybrid": _HYBRID,
    "qwen3_5_moe": _HYBRID,
    "qwen4_exp": "multimodal text config; " + _NO_TINY,
    "gemma4": "multimodal (ForConditionalGeneration) wrapper with per-layer dense+MoE branches; " + _NO_TINY,
    "dots3_note": "multimodal model with a vision MoE as well as a text MoE; " + _NO_TINY,
    "axk1": "attention layout with mismatched rotary dims in small configs; " + _NO_TINY,
    "axk2": "attention layout with mismatched rotary dims in small configs; " + _NO_TINY,
    "hy_v4": _NO_TINY,
    "glm_moe_dsa": "decoder layers hand sparse-attention indices (DSA indexer) to the next layer; "
    "the layer-by-layer runner passes hidden states only",
    "beam": "a small config of this family has no MoE layer; " + _NO_TINY,
}


def known_families() -> list[str]:
    """Sorted model types moemerge can merge and calibrate."""
    return sorted(FAMILIES)
