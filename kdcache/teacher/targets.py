"""Turning teacher logits into cached targets: top-k log-probabilities plus the exact tail (a fixed
k or a mass-adaptive head), sampled targets (ids drawn from the teacher, with counts), and draws
from the tail that a head leaves (head + sampled tail).

Works on [N, V] logits of valid positions only (padding already dropped), a chunk of positions at
a time, so at most a few float32 [chunk × V] tensors exist however large the batch or vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch

# float32 elements per chunk: ~16 MB on CPU stays in cache and below glibc's mmap threshold (no page
# faults per chunk); GPUs want fewer, larger kernels.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


@dataclasses.dataclass
class TopKTargets:
    ids: torch.Tensor            # int64 [N, k], sorted by descending probability
    logprobs: torch.Tensor       # float32 [N, k], log p at T=1 over the first `vocab_size` logits
    tail_logprob: torch.Tensor   # float32 [N], log of the mass outside the top-k (-inf if none)
    next_logprob: torch.Tensor   # float32 [N], log p of the actual next token (nan where none)


def topk_targets(logits: torch.Tensor, next_ids: torch.Tensor, *, vocab_size: int, top_k: int,
                 chunk_size: int | None = None, overwrite_logits: bool = False) -> TopKTargets:
    """Top-k log-probs, exact tail log-mass and next-token log-prob for each row of `logits`.

    Logits beyond `vocab_size` (padded vocabulary rows no tokenizer id maps to) are excluded, so
    the distribution is over the tokenizer's vocabulary. The tail is a log-normaliser over the
    logits with the top-k masked out, not `1 - sum(top-k)`, which would lose tails below
    float32's resolution next to 1. `next_ids` holds -1 where a position has no next token.

    Cost per chunk: one top-k pass and one fused `log_softmax` pass (a vectorised single kernel,
    faster than `logsumexp` on CPU). With the top-k masked to -inf, `log_softmax` at the (k+1)-th
    best entry j (never in the top-k) is `x_j - lse(rest)`; the full normaliser is then
    `logaddexp(lse(rest), lse(top-k))`, exact without a second pass. The masking happens in
    place when the caller allows it (`overwrite_logits`, e.g. a model output it discards), on a
    copy otherwise.
    """
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS.get(logits.device.type, 1 << 22) // vocab_size)
    keep = min(top_k + 1, vocab_size)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start:start + chunk_size, :vocab_size]
        chunk = chunk.float() if chunk.dtype != torch.float32 or overwrite_logits else chunk.clone()
        values, ids = torch.topk(chunk, keep, dim=-1, sorted=True)
        nexts = next_ids[start:start + chunk_size]
        next_logit = chunk.gather(1, nexts.clamp(min=0).unsqueeze(1)).squeeze(1)
        head = torch.logsumexp(values[:, :top_k], dim=-1)
        if keep > top_k:
            best_rest, best_rest_id = values[:, top_k], ids[:, top_k:]
            chunk.scatter_(1, ids[:, :top_k], float("-inf"))
            rest = best_rest - torch.log_softmax(chunk, dim=-1).gather(1, best_rest_id).squeeze(1)
            rest = torch.where(torch.isneginf(best_rest), best_rest, rest)
            log_normaliser = torch.logaddexp(head, rest)
            tail = rest - log_normaliser
        else:
            log_normaliser = head
            tail = torch.full_like(head, float("-inf"))
        next_logprob = torch.where(nexts >= 0, next_logit - log_normaliser, torch.nan)
        parts.append((ids[:, :top_k], values[:, :top_k] - log_normaliser.unsqueeze(1), tail, next_logprob))
    ids, logprobs, tail, next_logprob = (torch.cat(column) for column in zip(*parts))
    return TopKTargets(ids=ids, logprobs=logprobs, tail_logprob=tail, next_logprob=next_logprob)


@dataclasses.dataclass
class SampledTargets:
    """Per position, the distinct ids drawn with replacement from the teacher, and their counts.

    Ragged over N positions: position t holds `ids[offsets[t]:offsets[t + 1]]` (ascending) with
    `counts` summing to the number of draws; count / draws is an unbiased estimate of p.
    """

    ids: torch.Tensor      # int64 [U]
    counts: torch.Tensor   # int64 [U]
    offsets: torch.Tensor  # int64 [N + 1], offsets[0] = 0


def sampling_uniforms(sample_ids: list[int], lengths: list[int], num_samples: int, seed: int) -> torch.Tensor:
    """Uniform(0, 1) numbers [Σ lengths, num_samples] that drive the draws, one generator per sequence.

    Each sequence's generator is seeded from (seed, sample_id) alone, so a sequence gets the same
    draws whatever the batch size, shard layout or process count. They are made on the CPU, whose
    generator is the same on every machine, and moved to the logits' device by the caller.
    """
    parts = []
    for sample_id, length in zip(sample_ids, lengths):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + sample_id) % 2**63)
        parts.append(torch.rand(length, num_samples, generator=generator, dtype=torch.float64))
    return torch.cat(parts)


def select_head(targets: TopKTargets, *, top_k: int, top_p: float | None) -> TopKTargets:
    """Keep, per position, the most probable ids up to `top_k`, and with `top_p` only until their mass
    reaches it (at least one id): peaked positions list a few ids, flat ones up to `top_k`.

    Dropped entries become empty slots (log-prob -inf) and their mass joins the tail, which stays
    exact: a log-sum over the old tail and the dropped log-probs, never `1 - Σ kept`.
    """
    order = targets.logprobs.argsort(dim=1, descending=True, stable=True)
    logprobs = targets.logprobs.gather(1, order)
    ids = targets.ids.gather(1, order)
    probs = logprobs.exp()
    keep = torch.arange(logprobs.shape[1], device=logprobs.device) < top_k
    if top_p is not None:
        keep = keep & (probs.cumsum(1) - probs < top_p)
    keep = keep & (logprobs > float("-inf"))
    dropped = torch.logsumexp(logprobs.masked_fill(keep, float("-inf")), dim=1)
    width = max(int(keep.sum(1).max()), 1) if keep.numel() else min(top_k, logprobs.shape[1])
    return dataclasses.replace(targets, ids=ids[:, :width], logprobs=logprobs.masked_fill(~keep, float("-inf"))[:, :width],
                               tail_logprob=torch.logaddexp(targets.tail_logprob, dropped))


def sampled_targets(logits: torch.Tensor, uniforms: torch.Tensor, *, vocab_size: int,
                    exclude: TopKTargets | None = None, systematic: bool = False,
                    draws_per_row: torch.Tensor | None = None, chunk_size: int | None = None) -> SampledTargets:
    """Draw `uniforms.shape[1]` ids per row of `logits` from softmax(logits[:, :vocab_size]) at T=1,
    or, with `exclude`, from the teacher's tail: the distribution renormalised without its listed ids.

    Inverse-CDF sampling: the draw for u is the first id whose cumulative probability exceeds
    u · total, so ids of zero probability are never drawn. Independent draws take N uniforms;
    `systematic` draws take the first alone and place the N points at (u + i) / N, i = 0..N-1.
    Either way an id of probability q is drawn N·q times in expectation, so count / N stays an
    unbiased estimate; systematic draws are never more than one apart from N·q, so an id with
    N·q < 1 is drawn at most once: N distinct ids instead of fewer with repeats, and the
    variance of every count at most that of independent draws. The cumulative sum is float64, so its
    rounding (~1e-16 per step) does not bias the draws even over 10^5 ids; hence the smaller
    default chunk (one float64 [chunk × V] tensor at a time: 512 rows, fewer above 65,536 classes, 128 at
    262,144, so that it stays 256 MiB). A row with nothing left to draw from
    (the head lists every id) gets no draws. Systematic draws may take `draws_per_row` (each
    between 1 and N) points instead of N.
    """
    if chunk_size is None:
        chunk_size = min(512, max(1, (1 << 25) // vocab_size))
    ids, counts, unique_per_row = [], [], []
    for start in range(0, logits.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = logits[rows, :vocab_size]
        if exclude is not None:  # empty head slots repeat the first id, so masking them changes nothing
            listed = exclude.logprobs[rows] > float("-inf")
            head = torch.where(listed, exclude.ids[rows], exclude.ids[rows, :1])
            chunk = chunk.float().scatter(1, head.to(chunk.device), float("-inf"))
        cdf = torch.softmax(chunk, dim=-1, dtype=torch.float64).cumsum_(dim=-1)
        drawable = cdf[:, -1] > 0  # False for NaN: a row whose every logit was masked
        u = uniforms[rows].to(cdf.device)[drawable]
        slot = torch.arange(u.shape[1], device=u.device)
        points = torch.full_like(u[:, :1], u.shape[1])
        if draws_per_row is not None:
            points = draws_per_row[rows].to(u.device)[drawable].unsqueeze(1).to(u.dtype)
        if systematic:
            u = (u[:, :1] + slot) / points
        u = u * cdf[drawable, -1:]
        draws = torch.searchsorted(cdf[drawable], u, right=True).clamp_(max=vocab_size - 1)
        draws = draws.masked_fill_(slot >= points, vocab_size).sort(dim=-1).values  # unused points sort last
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        starts = first.reshape(-1).nonzero().squeeze(1)
        ends = torch.cat([starts[1:], starts.new_tensor([draws.numel()])])
        drawn = draws.reshape(-1)[starts] < vocab_size
        ids.append(draws.reshape(-1)[starts][drawn])
        counts.append((ends - starts)[drawn])
        distinct = (first & (draws < vocab_size)).sum(dim=-1)
        unique_per_row.append(torch.zeros_like(drawable, dtype=torch.long).masked_scatter_(drawable, distinct))
    unique = torch.cat(unique_per_row)
    offsets = torch.cat([unique.new_zeros(1), unique.cumsum(0)])
    return SampledTargets(ids=torch.cat(ids), counts=torch.cat(counts), offsets=offsets)


def tail_draws(tail_logprob: torch.Tensor, samples: int) -> torch.Tensor:
    """Draws per position in proportion to the tail mass r: ceil(N · r), at least 1 and at most N.

    Each drawn id then stands for about r / ceil(N · r) ≈ 1 / N of probability wherever it is drawn, which
    is the allocation of a fixed number of draws that minimises the summed variance of the estimates
    (Σ r² / n subject to Σ n fixed gives n ∝ r): a position whose head holds 95% of the mass needs
    few draws, one whose tail holds most of it many.
    """
    return (samples * tail_logprob.double().exp()).ceil().clamp(1, samples).long().cpu()
