"""Losses on the output head's logits, computed from the final hidden states chunk by chunk.

A model with a 262,144-entry vocabulary turns 4,096 positions into a 4 GiB float32 logits tensor, and
autograd keeps several more of that size (softmax copies, the gradient). The losses kdcache computes on
those logits are sums over positions, so they can be taken a few positions at a time: project a chunk of
hidden states through the head, compute the chunk's share of each loss and, while the chunk's logits
still exist, its gradients with respect to the hidden states, the head's weight and bias (the technique
of Liger-Kernel's fused linear losses). Nothing of size positions × vocabulary outlives one chunk, and
backward only scales the saved gradients, so the head's matrix products run once each, as without
chunking: the same arithmetic as the unfused path, in chunks, hence the same loss and gradients up to
float rounding (tests/test_fused.py compares them at 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import SparseTargets, kd_loss, next_token_ce

__all__ = ["OutputHead", "ChunkTerms", "fused_head_loss", "fused_kd_loss", "default_chunk_size", "rows_of"]

# Elements of one chunk's [chunk, vocabulary] logits: 2^24 float32 = 64 MiB, a few copies of which are live
# at once (logits, the loss's working copy, their gradients). 64 positions at 262,144 entries, 512 at 32,768.
CHUNK_ELEMENTS = 2**24

# A chunk's share of each term: `terms(logits, rows)` for the logits of the positions `rows` of the N, the
# unweighted term values scaled so that their sum over the chunks is the term over all N positions.
ChunkTerms = Callable[[torch.Tensor, slice], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class OutputHead:
    """What a model does to its final hidden states to get logits: `softcap·tanh(scale·(h·Wᵀ + b)/softcap)`.

    `weight` [C, d] (and `bias` [C]) are the output layer's own parameters (tied to the input embeddings
    or not: gradients reach them either way), sliced to the C classes the loss ranges over. `scale`
    multiplies the logits (Cohere's `logit_scale`, 1/Granite's `logits_scaling`), `softcap` caps them
    (Gemma's `final_logit_softcapping`). `kdcache.models.output_head(model)` reads them off a model.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, head: OutputHead | torch.nn.Linear) -> OutputHead:
        return head if isinstance(head, OutputHead) else cls(head.weight, head.bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits of `hidden` [N, d]: what the model computes, for the unfused path and tests."""
        return self.transform(F.linear(hidden, self.weight, self.bias))

    def transform(self, linear: torch.Tensor) -> torch.Tensor:
        out = linear * self.scale if self.scale != 1.0 else linear
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def default_chunk_size(num_classes: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(num_classes, 1))


def rows_of(targets: SparseTargets, rows: slice) -> SparseTargets:
    """The targets of positions `rows`."""
    return SparseTargets(ids=targets.ids[rows], logprobs=targets.logprobs[rows],
                         tail_logprob=None if targets.tail_logprob is None else targets.tail_logprob[rows])


def fused_head_loss(hidden: torch.Tensor, head: OutputHead, terms: ChunkTerms, weights: dict[str, float],
                    chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Σ weights[name]·term, the unweighted terms, detached) of `terms` on the logits of `hidden` [N, d].

    The generic engine behind `fused_kd_loss` and train-student's fused path: `terms` is evaluated on one
    chunk of `chunk_size` positions at a time (default: `default_chunk_size`), with gradients taken
    chunk by chunk when autograd needs them. Second derivatives are not supported.
    """
    if hidden.dim() != 2 or hidden.shape[-1] != head.weight.shape[-1]:
        raise ValueError(f"hidden must be [N, d={head.weight.shape[-1]}], got {tuple(hidden.shape)}")
    chunk_size = chunk_size or default_chunk_size(head.weight.shape[0])
    values: dict[str, torch.Tensor] = {}
    inputs = (hidden, head.weight, head.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        total = _FusedHeadLoss.apply(hidden, head.weight, head.bias, head, terms, weights, chunk_size, values)
    else:
        total = _forward_chunks(hidden, head, terms, weights, chunk_size, values, grads=None)
    return total, values


def fused_kd_loss(hidden: torch.Tensor, head: OutputHead | torch.nn.Linear, targets: SparseTargets | None, *,
                  labels: torch.Tensor | None = None, kd_weight: float = 1.0, ce_weight: float = 0.0,
                  divergence: str = "forward_kl", tail: str = "rest-bucket", temperature: float = 1.0,
                  beta: float = 0.5, skew: float = 0.1, akl_mu: float = 0.5, ignore_index: int = -100,
                  chunk_size: int | None = None) -> torch.Tensor:
    """`kd_weight·kd_loss(logits, targets) + ce_weight·next_token_ce(logits, labels)` without the logits.

    `hidden` [N, d] are the final hidden states at the N target positions (the rows `kd_loss` would get
    logits for, e.g. `output.hidden_states[-1][batch.valid]`), `head` the output layer
    (`model.get_output_embeddings()`, or `kdcache.models.output_head(model)` which also applies a model's
    logit scaling or soft-capping and checks that nothing else is applied). Every divergence, tail mode,
    temperature and target type of `kd_loss` is supported with the same meaning; `targets` may be None
    for CE alone. Peak memory holds one chunk's logits instead of N × vocabulary; the value and
    gradients equal the unfused ones up to float rounding.
    """
    head = OutputHead.of(head)
    options = {"divergence": divergence, "tail": tail, "temperature": temperature, "beta": beta, "skew": skew,
               "akl_mu": akl_mu}
    weights = {"kd": kd_weight if targets is not None else 0.0, "ce": ce_weight if labels is not None else 0.0}
    if targets is not None:  # refuse bad options once, before any chunk (and for N = 0 too)
        kd_loss(hidden.new_zeros(0, head.weight.shape[0]), rows_of(targets, slice(0, 0)), **options)
    terms = kd_terms(targets if weights["kd"] else None, labels if weights["ce"] else None,
                     ignore_index=ignore_index, **options)
    return fused_head_loss(hidden, head, terms, weights, chunk_size)[0]


def kd_terms(targets: SparseTargets | None, labels: torch.Tensor | None, *, ignore_index: int = -100,
             **options) -> ChunkTerms:
    """The chunk shares of `kd` (`kd_loss` with `options`, a mean over the positions) and `ce`
    (`next_token_ce`, a mean over the labelled positions) for the same N positions: each chunk's mean
    weighted by its share."""
    n = targets.ids.shape[0] if targets is not None else 0
    labelled = None if labels is None else int((labels != ignore_index).sum())

    def terms(logits: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
        out = {}
        if labels is not None:
            chunk = labels[rows]
            out["ce"] = (next_token_ce(logits, chunk, ignore_index)
                         * (int((chunk != ignore_index).sum()) / max(labelled, 1)))
        if targets is not None:
            out["kd"] = kd_loss(logits, rows_of(targets, rows), **options) * share(logits.shape[0], n)
        return out
    return terms


def share(rows: int, n: int) -> float:
    """The weight of a mean over `rows` positions in the mean over all n (1.0 exactly when rows = n)."""
    return rows / n if n else 0.0


def _chunks(n: int, chunk_size: int):
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)] or [slice(0, 0)]


def _forward_chunks(hidden, head: OutputHead, terms: ChunkTerms, weights: dict[str, float], chunk_size: int,
                    values: dict, grads: tuple | None) -> torch.Tensor:
    """Σ over the chunks of the weighted terms; with `grads` (hidden, weight, bias accumulators or None),
    also their gradients, each chunk's taken before its logits are freed."""
    total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    for rows in _chunks(hidden.shape[0], chunk_size):
        h = hidden[rows]
        linear = F.linear(h, head.weight, head.bias)
        with torch.set_grad_enabled(grads is not None):
            if grads is not None:
                linear.requires_grad_(True)
            chunk_terms = terms(head.transform(linear), rows)
            loss = sum(weights.get(name, 0.0) * value for name, value in chunk_terms.items())
        if grads is not None and torch.is_tensor(loss) and loss.requires_grad:
            (grad_linear,) = torch.autograd.grad(loss, linear)
            grad_hidden, grad_weight, grad_bias = grads
            if grad_hidden is not None:
                grad_hidden[rows] = grad_linear @ head.weight.to(grad_linear.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_linear.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
            if grad_bias is not None:
                grad_bias.add_(grad_linear.sum(0).to(grad_bias.dtype))
        total = total + (loss.detach() if torch.is_tensor(loss) else loss)
        for name, value in chunk_terms.items():
            values[name] = values.get(name, 0.0) + value.detach()
    return total


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, terms, weights, chunk_size, values):
        needs = ctx.needs_input_grad
        grads = (torch.zeros_like(hidden) if needs[0] else None,
                 torch.zeros_like(weight) if needs[1] else None,
                 torch.zeros_like(bias) if bias is not None and needs[2] else None)
        detached = OutputHead(weight.detach(), None if bias is None else bias.detach(), head.scale, head.softcap)
        total = _forward_chunks(hidden.detach(), detached, terms, weights, chunk_size, values, grads)
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return (*scaled, None, None, None, None, None)



class HeadLogits:
    """The [N, C] logits of `hidden` [N, d] through `head`, computed only when a block of them is read.

    What the dump's target code (teacher/targets.py, fidelity.py) reads instead of the model's logits: it
    already works a chunk of rows at a time, `logits[rows, columns]`, so each chunk's logits exist only
    while that chunk is processed. Indexing rows alone (`logits[positions]`) selects rows without
    computing anything. Each read recomputes its chunk through the head: the price of never holding
    N × C (the top-k pass, the draws and the sampled fidelity positions each read theirs).
    """

    def __init__(self, hidden: torch.Tensor, head: OutputHead):
        self.hidden, self.head = hidden, head
        self.shape = torch.Size((hidden.shape[0], head.weight.shape[0]))
        self.device = head.weight.device

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            return HeadLogits(self.hidden[index], self.head)
        rows, columns = index
        head = self.head
        if columns != slice(None):
            head = OutputHead(head.weight[columns], None if head.bias is None else head.bias[columns], head.scale,
                              head.softcap)
        return head.logits(self.hidden[rows].to(self.device))
