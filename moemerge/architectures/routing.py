"""How each router kind turns logits into a choice of experts, for agreement metrics.

The choice depends only on the order of the selection scores: softmax is monotone, so softmax
routers choose the top-k logits; sigmoid routers choose the top-k of sigmoid(logit) plus the
selection bias (DeepSeek-V3's `e_score_correction_bias`). Group-limited selection (DeepSeek's
`n_group` / `topk_group`) is not modelled here: metrics then count the unrestricted top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moemerge.architectures.records import RouterKind

if TYPE_CHECKING:
    import torch


def selection_scores(
    logits: torch.Tensor, kind: RouterKind, selection_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores whose top-k are the chosen experts (logits already include any router bias)."""
    if kind == RouterKind.SIGMOID:
        scores = logits.float().sigmoid()
    elif selection_bias is not None:  # Ernie-4.5 adds its correction to the softmax probabilities
        scores = logits.float().softmax(dim=-1)
    else:
        return logits.float()
    return scores + selection_bias.float() if selection_bias is not None else scores


def top_k_experts(
    logits: torch.Tensor, kind: RouterKind, top_k: int, selection_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (n x k) of the experts each token is sent to."""
    return selection_scores(logits, kind, selection_bias).topk(top_k, dim=-1).indices


def top_k_agreement(reference: torch.Tensor, candidate: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per token, the fraction of the reference's top-k experts that the candidate also picks."""
    import torch

    ref = torch.zeros(reference.shape[0], num_experts, dtype=torch.bool, device=reference.device)
    cand = torch.zeros_like(ref)
    ref.scatter_(1, reference, True)
    cand.scatter_(1, candidate, True)
    return (ref & cand).sum(dim=1).float() / reference.shape[1]
