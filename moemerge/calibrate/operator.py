"""The HARC curvature operator of one MoE router layer (docs/HARC.md, "Closed form and the linear operator").

For source model i with router parameters W_i (E x d), calibration activations X_i (N_i x d) and
per-token routing curvature H_i(x) (E x E), HARC works with the linear operator on E x d matrices

    A_i(V) = (1/N_i) sum_{x in X_i} H_i(x) V x x^T

and solves  sum_i A_i^g(W) = sum_i A_i^g(W_i)  where A_i^g is A_i blended with its own diagonal
(``gamma``). Flattening V row-major (index e * d + j), A_i is the E*d x E*d matrix
(1/N_i) sum_x kron(H_i(x), x x^T); it is never formed. A batch of tokens X (n x d) costs two
matrix products:

    Z  = V X^T                      (E x n)
    HZ = column-wise H(x) z         (E x n, elementwise from the stored source probabilities)
    A_i(V) += HZ X                  (E x d)

Per-token quantities are kept experts-first (E x n): the softmax and the reductions over a
token's E experts then run along contiguous rows of n tokens, and the second product reads HZ
contiguously. Tokens-first (n x E) took 1.3-1.7x as long per pass at E 8, d 64 (a softmax over
8 contiguous numbers per token is 8x slower than over 8 rows of n) and within 2% of it at E 64 and
E 128, d 2048 (docs/CALIBRATION.md, "Operator and preconditioner cost per iteration").

Router kinds and their curvature H(x) (the Hessian, at W = W_i, of the divergence that the
calibrated router should keep small):

- ``softmax``: p = softmax(W_i x) over all experts, H = diag(p) - p p^T, the Hessian of
  KL(softmax(W_i x) || softmax(W x)). Top-k selection with or without renormalising the k
  weights (OLMoE, Qwen-MoE, Mixtral) uses the same curvature: the probabilities are computed over
  all experts before the selection.
- ``topk_softmax``: top-k first, then a softmax over the k selected logits (GPT-OSS, Granite).
  We use the full softmax curvature; see :data:`ROUTER_KINDS` for why.
- ``sigmoid``: s = sigmoid(W_i x) per expert (DeepSeek-V3, GLM-4.5, MiniMax-M2), H = diag(s (1 - s)),
  the Hessian of sum_e KL(Bernoulli(s_ie) || Bernoulli(sigmoid(W x)_e)). The expert-selection
  bias (``e_score_correction_bias``) only shifts which experts are picked and is not part of W:
  never pass it as ``bias`` here.

A router bias b (GPT-OSS ``router.bias``) is solved jointly with W: the parameters become
[W, b] (E x (d + 1)) and every token is extended by a constant 1, so ``dim = d + 1``.

Distributed use: every statistic that sums over tokens (operator applications, diagonal, blocks,
Kronecker factors, token counts) passes its float64 partial sum through ``reduce`` before it is
normalised or used, so plugging in an all-reduce (sum) over ranks that hold different tokens of
the same domain gives the statistics of the union of their tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

RouterKind = Literal["softmax", "topk_softmax", "sigmoid"]
"""Router scoring functions the operator knows.

``topk_softmax`` (top-k, then softmax over the k) uses the full softmax curvature. The exact
objective for such a router, the KL between the renormalised distributions over the selected
set, has (i) zero curvature for every expert outside the source's top-k, so nothing would keep a
non-selected expert's logit from rising into the top-k, which is exactly the routing breakdown
HARC repairs, and (ii) a selection that jumps as W moves, so its second-order expansion at W_i
is blind to selection flips. Matching the full softmax over all logits matches their ordering
(hence the selection) and, restricted to the selected experts, their renormalised weights, and
it is smooth; its minimiser reproduces the source routing wherever a single router can.
"""

Reduce = Callable[[Tensor], Tensor]
"""Hook applied to every float64 partial sum over tokens before use (identity by default)."""

ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)


def identity_reduce(partial_sum: Tensor) -> Tensor:
    """The single-process reduction: the local sum is the global sum."""
    return partial_sum


def blend_coefficients(gamma: float) -> tuple[float, float]:
    """(a, c) with A^g(V) = a A(V) + c diag(A) * V for HARC's three gamma regimes.

    gamma < 1: gamma A + (1 - gamma) diag(A);  gamma > 1: A + (gamma - 1) diag(A);  gamma = 1: A.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if gamma < 1:
        return gamma, 1.0 - gamma
    if gamma > 1:
        return 1.0, gamma - 1.0
    return 1.0, 0.0


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)  # type: ignore[arg-type]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute dtype must be float32 or float64, got {dtype}")
    return dtype  # type: ignore[return-value]


class DomainCurvature:
    """Curvature statistics of one source domain: A_i, its diagonal, its blocks, Kronecker factors.

    Holds the activations X_i (any floating dtype; bf16 storage halves memory) and the per-token
    source routing quantity computed once from W_i (and b_i), E x N_i: the probabilities p for
    softmax kinds, s (1 - s) for sigmoid. Every product runs per token batch in ``dtype`` (float32 by
    default) and is summed into float64; results are float64 and already divided by N_i.

    Args:
        activations: X_i, N_i x d router inputs of this domain's (local) tokens.
        weight: W_i, the source router weight, E x d.
        bias: b_i (E,), the source router bias, or None. With a bias every method works on
            E x (d + 1) parameters [W, b] and tokens extended by a constant 1.
        kind: router scoring function, one of :data:`ROUTER_KINDS`.
        dtype: compute dtype of the per-batch products (float32 or float64).
        batch_size: tokens per batch.
        reduce: hook applied to each float64 partial sum over tokens (see module docstring).
        start: a point V0 (E x dim) whose image A_i(V0) the statistics sweep computes too
            (:meth:`start_image`): the CG start point, whose residual would otherwise cost an
            operator pass. None: no such point.
    """

    def __init__(
        self,
        activations: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        kind: RouterKind = "softmax",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 4096,
        reduce: Reduce | None = None,
        start: Tensor | None = None,
    ) -> None:
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {kind!r}; expected one of {ROUTER_KINDS}")
        if activations.dim() != 2:
            raise ValueError(f"activations must be N x d, got shape {tuple(activations.shape)}")
        if weight.dim() != 2 or weight.shape[1] != activations.shape[1]:
            raise ValueError(
                f"router weight must be E x d with d = {activations.shape[1]} (activations), "
                f"got shape {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"router bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.kind: RouterKind = kind
        self.dtype = _torch_dtype(dtype)
        self.batch_size = int(batch_size)
        self.reduce: Reduce = reduce or identity_reduce
        self.activations = activations
        self.has_bias = bias is not None
        self.num_experts = weight.shape[0]
        self.dim = activations.shape[1] + (1 if self.has_bias else 0)
        self.device = activations.device

        source = weight.to(device=self.device, dtype=torch.float64)
        if bias is not None:
            source = torch.cat([source, bias.to(device=self.device, dtype=torch.float64)[:, None]], dim=1)
        self.source = source
        """Source parameters W_i (or [W_i, b_i]) in float64, E x dim."""
        if start is not None and tuple(start.shape) != tuple(source.shape):
            raise ValueError(f"start must be {tuple(source.shape)}, got {tuple(start.shape)}")
        self.start = None if start is None else start.to(device=self.device, dtype=torch.float64)
        """The start point V0 in float64, E x dim, or None."""

        local_tokens = torch.tensor([float(activations.shape[0])], dtype=torch.float64, device=self.device)
        self.num_tokens = float(self.reduce(local_tokens).item())
        """N_i summed over all ranks."""
        if self.num_tokens <= 0:
            raise ValueError("a calibration domain has no tokens; every source needs calibration data")
        self._curvature, images, self._diagonal = self._source_statistics()
        self._source_image = images[: self.num_experts]
        self._start_image = images[self.num_experts :] if self.start is not None else None

    def _source_statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """One sweep over the tokens: per-token curvature, A_i(W_i) (and A_i(V0)) and diag(A_i).

        The per-token quantity is p (softmax kinds) or s (1 - s) (sigmoid), E x N in the compute
        dtype. A_i(W_i) (the right-hand side's term) reuses the logits Z = W_i X^T that the
        probabilities need, so it costs one matrix product instead of an operator pass; a start
        point V0 is stacked under W_i, so A_i(V0) shares both products with it (E rows more in
        each: about 0.6 of the pass it saves at E 8, d 64). The diagonal is summed from the same
        batch while it is in cache. Returns (curvature, [A_i(W_i); A_i(V0)], diag(A_i)).
        """
        E = self.num_experts
        points = self.source if self.start is None else torch.cat([self.source, self.start])
        points = points.to(self.dtype)
        parts = []
        images = torch.zeros(points.shape, dtype=torch.float64, device=self.device)
        diagonal = torch.zeros(E, self.dim, dtype=torch.float64, device=self.device)
        for _, xb in self._batches():
            logits = points @ xb.T
            if self.kind == "sigmoid":
                s = torch.sigmoid(logits[:E])
                curv = s * (1 - s)
            else:
                curv = torch.softmax(logits[:E], dim=0)
            parts.append(curv)
            for rows in logits.split(E):
                self._curvature_times(curv, rows)
            images += (logits @ xb).to(torch.float64)
            diagonal += (self._h_diagonal(curv) @ (xb * xb)).to(torch.float64)
        curvature = torch.cat(parts, dim=1) if parts else torch.empty(E, 0, dtype=self.dtype, device=self.device)
        return curvature, self._finish(images), self._finish(diagonal)

    def _curvature_times(self, curv: Tensor, z: Tensor) -> Tensor:
        """Column-wise H(x) z in place of ``z`` (E x n): s (1 - s) * z (sigmoid) or p * (z - <p, z>) (softmax).

        (diag(p) - p p^T) z = p * (z - p^T z): one reduction and two in-place products, no E x n temporaries.
        """
        if self.kind != "sigmoid":
            z -= torch.linalg.vecdot(curv, z, dim=0)
        return z.mul_(curv)

    def _batches(self) -> Iterator[tuple[int, Tensor]]:
        """(start, X[start:start + n] in the compute dtype, extended by a ones column with a bias)."""
        n_total, d = self.activations.shape
        buffer: Tensor | None = None
        for start in range(0, n_total, self.batch_size):
            chunk = self.activations[start : start + self.batch_size]
            if not self.has_bias and chunk.dtype == self.dtype:
                yield start, chunk
                continue
            n = chunk.shape[0]
            if buffer is None or buffer.shape[0] != n:
                buffer = torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
                if self.has_bias:
                    buffer[:, d] = 1.0
            buffer[:, :d].copy_(chunk)
            yield start, buffer

    def _rows(self, index: Tensor) -> Tensor:
        """The tokens at ``index`` in the compute dtype, extended by a ones column with a bias."""
        rows = torch.index_select(self.activations, 0, index).to(self.dtype)
        if self.has_bias:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=self.dtype, device=self.device)], dim=1)
        return rows

    def _h_diagonal(self, curv: Tensor) -> Tensor:
        """h_ee(x) for a batch: p (1 - p) for softmax kinds, s (1 - s) (stored as is) for sigmoid."""
        return curv if self.kind == "sigmoid" else curv * (1 - curv)

    def _finish(self, partial_sum: Tensor) -> Tensor:
        return self.reduce(partial_sum) / self.num_tokens

    def apply(self, V: Tensor) -> Tensor:
        """A_i(V) = (1/N_i) sum_x H_i(x) V x x^T for V of shape E x dim; float64 result."""
        if tuple(V.shape) != (self.num_experts, self.dim):
            raise ValueError(f"V must be {self.num_experts} x {self.dim}, got {tuple(V.shape)}")
        Vc = V.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(self.num_experts, self.dim, dtype=torch.float64, device=self.device)
        product = torch.empty(self.num_experts, self.dim, dtype=self.dtype, device=self.device)
        for start, xb in self._batches():
            z = self._curvature_times(self._curvature[:, start : start + xb.shape[0]], Vc @ xb.T)
            out += torch.mm(z, xb, out=product)
        return self._finish(out)

    def source_image(self) -> Tensor:
        """A_i(W_i) (or A_i([W_i, b_i])), E x dim float64; computed with the curvature (one sweep)."""
        return self._source_image

    def start_image(self) -> Tensor:
        """A_i(V0) for the ``start`` point, E x dim float64; computed with the curvature (one sweep)."""
        if self._start_image is None:
            raise ValueError("this domain was built without a start point")
        return self._start_image

    def diagonal(self) -> Tensor:
        """Exact diag(A_i) as an E x dim matrix: (1/N_i) sum_x h_ee(x) x_j^2; float64."""
        return self._diagonal

    def blocks(self, out: Tensor | None = None) -> Tensor:
        """Exact per-expert diagonal blocks B_e = (1/N_i) sum_x h_ee(x) x x^T, E x dim x dim float64.

        E * dim^2 numbers; costs about dim / 2 operator applications (2 E N dim^2 flops). With
        ``out`` the blocks are added into it (no second E x dim x dim buffer) and it is returned.
        """
        shape = (self.num_experts, self.dim, self.dim)
        if out is None:
            out = torch.zeros(shape, dtype=torch.float64, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != torch.float64:
            raise ValueError(f"out must be float64 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        # Expert-outer loop: only one dim x dim partial sum is alive, and each goes through the hook.
        for e in range(self.num_experts):
            partial = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
            for start, xb in self._batches():
                h = self._h_diagonal(self._curvature[e, start : start + xb.shape[0]])
                partial += ((xb * h[:, None]).T @ xb).to(torch.float64)
            out[e] += self._finish(partial)
        return out

    def grouped_blocks(self, out: Tensor, stride: int = 1) -> Tensor:
        """Add this domain's grouped approximation of every expert's diagonal block into ``out``.

        The exact block is B_e = (1/N_i) sum_x h_ee(x) x x^T: one weighted Gram per expert, E of
        them (``blocks``, E / 2 operator passes' worth of work per input column). Here the tokens
        are split into E groups by the expert of largest curvature h_ee(x), and within a group g
        the weight h_ee(x) is replaced by its group mean:

            B_e ~= (1/N_i) sum_g mean_{x in g}(h_ee(x)) G_g,    G_g = sum_{x in g} x x^T.

        The group Grams cost one Gram of the domain (about dim / (2E) passes, as for the Kronecker
        factor), and each expert still gets its own block that sees which tokens it routes and
        which domain they come from. With ``stride`` > 1 only every stride-th token is used (a
        preconditioner needs the blocks' shape, not their last digits; the Gram's cost falls by
        that factor) and the sums are normalised by the subsample's size. ``out``
        (E x dim x dim float64) is returned; the group Grams, counts and curvature sums go
        through ``reduce``.
        """
        E, dim = self.num_experts, self.dim
        shape = (E, dim, dim)
        if tuple(out.shape) != shape or out.dtype != torch.float64:
            raise ValueError(f"out must be float64 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        h = self._h_diagonal(self._curvature[:, ::stride])
        group = torch.max(h, dim=0).indices  # 10x faster than argmax(dim=0) over E x n on CPU
        curvature_sums = torch.zeros(E, E, dtype=torch.float64, device=self.device)
        curvature_sums.index_add_(0, group, h.T.to(torch.float64))
        sizes = torch.bincount(group, minlength=E)
        grams = torch.zeros(shape, dtype=torch.float64, device=self.device)
        order = torch.argsort(group) * stride  # token indices, grouped
        first = 0
        for g, size in enumerate(sizes.tolist()):  # one Gram per group, over its tokens in batches
            for start in range(first, first + size, self.batch_size):
                xg = self._rows(order[start : min(start + self.batch_size, first + size)])
                grams[g] += (xg.T @ xg).to(torch.float64)
            first += size
        counts = self.reduce(sizes.to(torch.float64))
        grams = self.reduce(grams)
        mean_curvature = self.reduce(curvature_sums) / counts.clamp(min=1.0)[:, None]  # group x expert
        # out_e += (1/n) sum_g mean_curvature[g, e] G_g over the n (sub)sampled tokens, as one
        # product without an E x dim x dim temporary
        used = float(counts.sum().item())
        out.view(E, dim * dim).addmm_(mean_curvature.T, grams.view(E, dim * dim), alpha=1.0 / max(used, 1.0))
        return out

    def expert_factor(self) -> Tensor:
        """(1/N_i) sum_x H_i(x), E x E float64 and positive semi-definite (Kronecker preconditioner)."""
        sums = torch.zeros(self.num_experts, dtype=torch.float64, device=self.device)
        outer = torch.zeros(self.num_experts, self.num_experts, dtype=torch.float64, device=self.device)
        for start in range(0, self._curvature.shape[1], self.batch_size):
            curv = self._curvature[:, start : start + self.batch_size]
            sums += curv.sum(dim=1).to(torch.float64)
            if self.kind != "sigmoid":
                outer += (curv @ curv.T).to(torch.float64)
        factor = torch.diag(self._finish(sums))
        if self.kind != "sigmoid":
            factor -= self._finish(outer)
        return factor

    def input_gram(self, stride: int = 1) -> Tensor:
        """(1/N_i) sum_x x x^T, dim x dim float64 (Kronecker preconditioner).

        With ``stride`` > 1 from every stride-th token, normalised by their number (as
        :meth:`grouped_blocks`).
        """
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        out = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        used = 0
        for start, xb in self._batches():
            xs = xb[(-start) % stride :: stride]  # global token index a multiple of stride
            used += xs.shape[0]
            out += (xs.T @ xs).to(torch.float64)
        used_tokens = self.reduce(torch.tensor([float(used)], dtype=torch.float64, device=self.device))
        return self.reduce(out) / used_tokens.clamp(min=1.0)


class HarcSystem:
    """The HARC normal equations  sum_i A_i^g(W) = sum_i A_i^g(W_i)  over all source domains.

    Each domain is weighted equally whatever its token count (A_i already carries 1/N_i). The
    gamma blend uses each domain's own diagonal; since it is linear, sum_i A_i^g(V) =
    a sum_i A_i(V) + c (sum_i diag(A_i)) * V with (a, c) = :func:`blend_coefficients`.
    """

    def __init__(self, domains: Sequence[DomainCurvature], gamma: float = 0.9) -> None:
        if not domains:
            raise ValueError("HarcSystem needs at least one source domain")
        first = domains[0]

        def signature(dom: DomainCurvature) -> tuple:
            return (dom.num_experts, dom.dim, dom.kind, dom.dtype)

        for i, dom in enumerate(domains):
            if signature(dom) != signature(first):
                raise ValueError(
                    f"domain {i} has (experts, dim, kind, dtype) = {signature(dom)}, domain 0 has {signature(first)}"
                )
        self.domains = list(domains)
        self.gamma = float(gamma)
        self.coef_operator, self.coef_diagonal = blend_coefficients(self.gamma)
        self.num_experts = first.num_experts
        self.dim = first.dim
        self.kind: RouterKind = first.kind
        self.dtype = first.dtype
        self.device = first.device
        self._domain_diagonals: list[Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_experts, self.dim)

    def domain_diagonals(self) -> list[Tensor]:
        """diag(A_i) of every domain (unblended), computed once."""
        if self._domain_diagonals is None:
            self._domain_diagonals = [dom.diagonal() for dom in self.domains]
        return self._domain_diagonals

    def unblended_diagonal(self) -> Tensor:
        """sum_i diag(A_i), E x dim float64."""
        return torch.stack(self.domain_diagonals()).sum(dim=0)

    def apply(self, V: Tensor) -> Tensor:
        """sum_i A_i^g(V), float64 E x dim."""
        out = sum(dom.apply(V) for dom in self.domains)
        out = self.coef_operator * out
        if self.coef_diagonal:
            out += self.coef_diagonal * self.unblended_diagonal() * V.to(torch.float64)
        return out

    def rhs(self) -> Tensor:
        """sum_i A_i^g(W_i), float64 E x dim."""
        out = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        for dom, diag in zip(self.domains, self.domain_diagonals(), strict=True):
            out += self.coef_operator * dom.source_image()
            if self.coef_diagonal:
                out += self.coef_diagonal * diag * dom.source
        return out

    def start_image(self) -> Tensor:
        """sum_i A_i^g(V0) for the domains' common ``start`` point V0, float64 E x dim (no operator pass)."""
        start = self.domains[0].start
        if start is None or any(dom.start is None or not torch.equal(dom.start, start) for dom in self.domains):
            raise ValueError("start_image needs every domain built with the same start point")
        out = self.coef_operator * sum(dom.start_image() for dom in self.domains)
        if self.coef_diagonal:
            out += self.coef_diagonal * self.unblended_diagonal() * start
        return out

    def diagonal(self) -> Tensor:
        """Exact diagonal of the blended operator, E x dim float64."""
        return (self.coef_operator + self.coef_diagonal) * self.unblended_diagonal()

    def blocks(self) -> Tensor:
        """Exact per-expert dim x dim diagonal blocks of the blended operator, E x dim x dim float64.

        gamma < 1: gamma B_e + (1 - gamma) diag(B_e);  gamma > 1: B_e + (gamma - 1) diag(B_e).
        """
        out = torch.zeros(self.num_experts, self.dim, self.dim, dtype=torch.float64, device=self.device)
        for dom in self.domains:
            dom.blocks(out=out)
        if self.coef_operator != 1.0:
            out *= self.coef_operator
        if self.coef_diagonal:
            out.diagonal(dim1=1, dim2=2).add_(self.coef_diagonal * self.unblended_diagonal())
        return out

    def grouped_blocks(self, stride: int = 1) -> Tensor:
        """Per-expert dim x dim blocks from the domains' grouped Grams, with the exact blended diagonal.

        Each domain's :meth:`DomainCurvature.grouped_blocks` (from every ``stride``-th token) is
        summed, then every block is scaled symmetrically (S B S with S diagonal, so it stays positive
        semi-definite) until its diagonal is the exact diag(B_e), and blended like :meth:`blocks`.
        E x dim x dim float64.
        """
        out = torch.zeros(self.num_experts, self.dim, self.dim, dtype=torch.float64, device=self.device)
        for dom in self.domains:
            dom.grouped_blocks(out, stride)
        exact = self.unblended_diagonal()
        approx = torch.diagonal(out, dim1=1, dim2=2)
        scale = torch.where(approx > 0, exact / approx.clamp(min=torch.finfo(torch.float64).tiny), 0.0).sqrt()
        out *= scale[:, :, None]
        out *= scale[:, None, :]
        if self.coef_operator != 1.0:
            out *= self.coef_operator
        if self.coef_diagonal:
            out.diagonal(dim1=1, dim2=2).add_(self.coef_diagonal * exact)
        return out

    def kronecker_factors(self, stride: int = 1) -> tuple[Tensor, Tensor]:
        """(mean_i (1/N_i) sum_x H_i(x)  [E x E],  mean_i (1/N_i) sum_x x x^T  [dim x dim]), float64.

        The input Gram from every ``stride``-th token (:meth:`DomainCurvature.input_gram`).
        """
        k = len(self.domains)
        expert = sum(dom.expert_factor() for dom in self.domains) / k
        gram = sum(dom.input_gram(stride) for dom in self.domains) / k
        return expert, gram

    def null_space_projector(self) -> Callable[[Tensor], Tensor] | None:
        """Orthogonal projector that removes the operator's structural null space, or None.

        Only gamma = 1 leaves the system singular by construction: for softmax kinds,
        H(x) 1 = 0, so adding one vector c to every expert's row (V + 1 c^T) changes nothing. The
        projector removes the mean over experts (each column of V minus its mean). Directions
        that no token's activation reaches (the null space of the pooled input Gram, only
        possible with fewer tokens than dim or degenerate activations) are not removed. Sigmoid
        curvature is diagonal and positive, so there is no structural null space (None).
        """
        if self.coef_diagonal or self.kind == "sigmoid":
            return None
        return _remove_expert_mean


def _remove_expert_mean(V: Tensor) -> Tensor:
    return V - V.mean(dim=0, keepdim=True)
