"""Turning teacher logits into cached targets: top-k log-probabilities plus the exact tail.

Works on [N, V] logits of valid positions only (padding already dropped), a chunk of positions at
a time, so at most one float32 [chunk × V] tensor exists however large the batch or vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class TopKTargets:
    ids: torch.Tensor            # int64 [N, k], sorted by descending probability
    logprobs: torch.Tensor       # float32 [N, k], log p at T=1 over the first `vocab_size` logits
    tail_logprob: torch.Tensor   # float32 [N], log of the mass outside the top-k (-inf if none)
    next_logprob: torch.Tensor   # float32 [N], log p of the actual next token (nan where none)


def topk_targets(logits: torch.Tensor, next_ids: torch.Tensor, *, vocab_size: int, top_k: int,
                 chunk_size: int = 4096) -> TopKTargets:
    """Top-k log-probs, exact tail log-mass and next-token log-prob for each row of `logits`.

    Logits beyond `vocab_size` (padded vocabulary rows no tokenizer id maps to) are excluded, so
    the distribution is over the tokenizer's vocabulary. The tail is a logsumexp over the logits
    with the top-k masked out, not `1 - sum(top-k)`, which would lose tails below float32's
    resolution next to 1. `next_ids` holds -1 where a position has no next token.
    """
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start:start + chunk_size, :vocab_size].float()
        log_normaliser = torch.logsumexp(chunk, dim=-1)
        values, ids = torch.topk(chunk, top_k, dim=-1, sorted=True)
        nexts = next_ids[start:start + chunk_size]
        next_logit = chunk.gather(1, nexts.clamp(min=0).unsqueeze(1)).squeeze(1)
        next_logprob = torch.where(nexts >= 0, next_logit - log_normaliser, torch.nan)
        chunk.scatter_(1, ids, float("-inf"))
        tail = torch.logsumexp(chunk, dim=-1) - log_normaliser
        parts.append((ids, values - log_normaliser.unsqueeze(1), tail, next_logprob))
    ids, logprobs, tail, next_logprob = (torch.cat(column) for column in zip(*parts))
    return TopKTargets(ids=ids, logprobs=logprobs, tail_logprob=tail, next_logprob=next_logprob)
