"""Routing metrics of one MoE layer: how a candidate's routing differs from its source's on the same tokens.

For n tokens, the source (reference) and the candidate each give router logits (n x E, any router
bias included). From them:

- **top-k agreement**: per token, the fraction of the source's top-k experts that the candidate also
  picks (`architectures.routing.top_k_agreement`); each model picks with its own selection bias.
- **exact match**: per token, 1 if the two top-k *sets* are equal (order ignored).
- **KL(source || candidate)**: for softmax routers (`softmax`, `topk_softmax`) the KL divergence of the
  softmax over all experts, sum_e p_e log(p_e / q_e); for `sigmoid` routers each expert is an
  independent Bernoulli gate, so the divergence is the sum over experts of Bernoulli KLs,
  sum_e s_e log(s_e / t_e) + (1 - s_e) log((1 - s_e) / (1 - t_e)) with s = sigmoid(source logits),
  t = sigmoid(candidate logits). These are the divergences whose curvature HARC uses (docs/HARC.md).
  The selection bias only chooses experts and is not part of either distribution.
- **expert load**: the fraction of all top-k assignments each expert receives (sums to 1), and its
  entropy in nats (ln E for a perfectly balanced layer, 0 when one expert takes everything).

`RoutingTally` sums these over batches, so every statistic is token-weighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moemerge.architectures.records import RouterKind
from moemerge.architectures.routing import top_k_agreement, top_k_experts

if TYPE_CHECKING:
    import torch


def routing_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor, kind: RouterKind) -> torch.Tensor:
    """Per token (n), KL(reference routing || candidate routing) in nats; see the module docstring."""
    import torch.nn.functional as F

    p_logits, q_logits = reference_logits.double(), candidate_logits.double()
    if kind == RouterKind.SIGMOID:
        log_s, log_not_s = F.logsigmoid(p_logits), F.logsigmoid(-p_logits)
        log_t, log_not_t = F.logsigmoid(q_logits), F.logsigmoid(-q_logits)
        bernoulli = log_s.exp() * (log_s - log_t) + log_not_s.exp() * (log_not_s - log_not_t)
        return bernoulli.sum(dim=-1)
    log_p, log_q = p_logits.log_softmax(dim=-1), q_logits.log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def kl_description(kind: RouterKind) -> str:
    """What `routing_kl` computes for routers of `kind`, in words (for reports)."""
    if kind == RouterKind.SIGMOID:
        return "sum over experts of Bernoulli KLs of the sigmoid gates, KL(source || candidate), nats"
    return "KL(source || candidate) of the softmax over all experts of the router logits, nats"


def exact_match(reference: torch.Tensor, candidate: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per token, 1.0 where the two top-k index sets (n x k each) are equal, else 0.0."""
    return (top_k_agreement(reference, candidate, num_experts) == 1.0).float()


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of all assignments (n x k indices) that go to each expert (E, sums to 1; zeros if n = 0)."""
    import torch

    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    total = counts.sum()
    return counts / total if total > 0 else counts


def load_entropy(load: list[float] | torch.Tensor) -> float:
    """Entropy in nats of an expert-load distribution (0 log 0 = 0)."""
    return -sum(float(p) * math.log(float(p)) for p in load if float(p) > 0)


@dataclass(frozen=True)
class LayerRouting:
    """Token-weighted routing statistics of one MoE layer on one domain's held-out tokens."""

    layer: int
    tokens: int
    agreement: float
    exact_match: float
    kl: float
    load: list[float]

    @property
    def load_entropy(self) -> float:
        return load_entropy(self.load)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "agreement": self.agreement,
            "exact_match": self.exact_match,
            "kl": self.kl,
            "load": self.load,
            "load_entropy": self.load_entropy,
            "load_entropy_max": math.log(len(self.load)),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerRouting:
        return cls(data["layer"], data["tokens"], data["agreement"], data["exact_match"], data["kl"], data["load"])


class RoutingTally:
    """Sums of the routing statistics of one layer over batches of tokens (candidate vs reference)."""

    def __init__(self, layer: int, num_experts: int, top_k: int, kind: RouterKind):
        import torch

        self.layer, self.num_experts, self.top_k, self.kind = layer, num_experts, top_k, kind
        self.tokens = 0
        self.agreement = 0.0
        self.exact = 0.0
        self.kl = 0.0
        self.counts = torch.zeros(num_experts, dtype=torch.float64)

    def update(
        self,
        reference_logits: torch.Tensor,
        candidate_logits: torch.Tensor,
        reference_selection_bias: torch.Tensor | None = None,
        candidate_selection_bias: torch.Tensor | None = None,
    ) -> None:
        """Add n tokens: router logits (n x E) of the reference and of the candidate, each with its own bias."""
        if reference_logits.shape != candidate_logits.shape:
            raise ValueError(
                f"layer {self.layer}: reference logits {tuple(reference_logits.shape)} "
                f"vs candidate logits {tuple(candidate_logits.shape)}"
            )
        ref = top_k_experts(reference_logits, self.kind, self.top_k, reference_selection_bias)
        cand = top_k_experts(candidate_logits, self.kind, self.top_k, candidate_selection_bias)
        self.tokens += reference_logits.shape[0]
        self.agreement += top_k_agreement(ref, cand, self.num_experts).double().sum().item()
        self.exact += exact_match(ref, cand, self.num_experts).double().sum().item()
        self.kl += routing_kl(reference_logits, candidate_logits, self.kind).sum().item()
        self.counts += expert_load(cand, self.num_experts).cpu() * cand.numel()

    def result(self) -> LayerRouting:
        if self.tokens == 0:
            raise ValueError(f"layer {self.layer}: no tokens were tallied")
        total = self.counts.sum()
        return LayerRouting(
            layer=self.layer,
            tokens=self.tokens,
            agreement=self.agreement / self.tokens,
            exact_match=self.exact / self.tokens,
            kl=self.kl / self.tokens,
            load=(self.counts / total).tolist(),
        )
