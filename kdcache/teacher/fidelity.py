"""The fidelity card: how much of the teacher each cached target type keeps, measured at dump time.

Only the dump sees the teacher's full distribution p, so it is the one place to measure what the
cache loses. Measuring costs several passes over the vocabulary per position (a third of the dump
loop when done everywhere), so by default the card is computed on a systematic sample: every
`every`-th target position of each teacher batch (`--fidelity-every`, default 8; 1 = all). Batches
depend only on the shard plan and batch size, so the sample does not depend on the number of
processes or on resumes. The card is stored in the manifest under `stats.fidelity`; all figures are
means over the measured positions, in nats where they are KL.

Top-k (+ exact tail r): the *rest-bucket reconstruction* is what a receiver can rebuild from the
cache: the m listed probabilities as stored (after the codec's rounding: float16 or 8-bit log
codes), and r spread evenly over the V - m other ids, renormalised together as the loss does
(m = the ids listed at that position: k, or fewer for a mass-adaptive head).
  captured_mass   Σ_listed p
  kl_rest_bucket  KL(p ‖ reconstruction)   (0 when every id is listed and stored exactly)
  tv_rest_bucket  ½ Σ_j |p_j - reconstruction_j|

Sampled (N draws, counts c): the cache holds p̂ = c / N on the drawn ids and nothing else, so
KL(p ‖ p̂) is infinite whenever p has mass outside the draws (always, for a softmax). The card
reports instead:
  captured_mass   Σ_drawn p: the teacher mass on the ids the cache lists
  kl_on_support   KL(p restricted to the drawn ids and renormalised ‖ p̂): the counting noise
  tv              ½ Σ_j |p_j - p̂_j| (p̂ = 0 off the draws), comparable with tv_rest_bucket
  distinct_ids    mean number of distinct ids stored per position

Head + sampled tail: the cache holds p̂ = the stored head probabilities, plus r · c / N on the ids
drawn from the tail; the same four figures are reported for it (kind "head-tail"), distinct_ids
counting head and drawn ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cache.stats import FidelitySums
from .targets import SampledTargets, TopKTargets


class FidelityCard(FidelitySums):
    """Measures the per-position figures on the device; the sums are kept by `FidelitySums`.

    `figures()` runs on the device inside the dump's per-batch step; the per-position figures then
    travel to the host with the batch, so the shard writer can `add()` only the rows it writes
    (non-finite rows are dropped) and keep one card per shard. `state()`/`merge_state()` let per-shard
    cards survive a resume and combine across processes into the cache's card.
    """

    def __init__(self, vocab_size: int, target_types: tuple[str, ...], *, top_k: int, draws: int | None,
                 every: int = 1, stored: Callable[[torch.Tensor], torch.Tensor] = lambda logprobs: logprobs):
        super().__init__(target_types, top_k=top_k, draws=draws, every=every)
        self.vocab_size = vocab_size
        self.stored = stored  # what a stored log-prob decodes to (the codec's rounding)

    def figures(self, logits: torch.Tensor, topk: TopKTargets, sampled: SampledTargets | None,
                chunk_size: int | None = None) -> dict[str, torch.Tensor]:
        """Per-position figures ("fidelity.<kind>.<name>" -> float64 [N], NaN where not measured) of the
        [N, V+] `logits` rows (valid positions only): every `every`-th position, a chunk at a time.

        Works on the logits' device with a few [chunk × V] temporaries, hence the smaller chunk (1,024 rows,
        fewer above 16,384 classes: 64 at 262,144).
        """
        if chunk_size is None:
            chunk_size = min(1024, max(1, (1 << 24) // self.vocab_size))
        measured = torch.arange(0, logits.shape[0], self.every, device=logits.device)
        logits, topk_ids, tail = logits[measured], topk.ids[measured], topk.tail_logprob[measured]
        topk_logprobs = self.stored(topk.logprobs[measured]).float().masked_fill(topk.logprobs[measured] == float("-inf"),
                                                                         float("-inf"))
        sampled = None if sampled is None else _select_positions(sampled, measured)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logp = torch.log_softmax(logits[rows, :self.vocab_size].float(), dim=-1)
            figures = {}
            if "topk" in self.target_types:
                figures |= self._topk_figures(logp, topk_ids[rows], topk_logprobs[rows], tail[rows])
            if "sampled" in self.target_types:
                figures |= self._sampled_figures(logp, sampled, rows, "sampled")
            if "head-tail" in self.target_types:
                figures |= self._sampled_figures(logp, sampled, rows, "head-tail",
                                                 head=(topk_ids[rows], topk_logprobs[rows], tail[rows]))
            for name, values in figures.items():
                parts.setdefault(f"fidelity.{name}", []).append(values.double())
        every_position = topk.ids.shape[0]
        return {name: torch.full((every_position,), torch.nan, dtype=torch.float64, device=measured.device)
                .index_copy_(0, measured, torch.cat(values)) for name, values in parts.items()}

    def _topk_figures(self, logp: torch.Tensor, ids: torch.Tensor, stored: torch.Tensor,
                      tail: torch.Tensor) -> dict[str, torch.Tensor]:
        p = logp.exp()
        listed_slots = stored > float("-inf")
        unlisted = (self.vocab_size - listed_slots.sum(1)).clamp(min=1).unsqueeze(1)
        # the reconstruction, in logs: listed ids as stored, the tail spread evenly, normalised together
        normaliser = torch.logaddexp(torch.logsumexp(stored, dim=1), tail).unsqueeze(1)
        log_rec = (tail.unsqueeze(1) - unlisted.log()).expand_as(logp).clone()
        slot_rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        log_rec[slot_rows[listed_slots], ids[listed_slots]] = stored[listed_slots].float()
        log_rec = log_rec - normaliser
        kl_terms = torch.where(p == 0, 0.0, p * (logp - log_rec))
        captured = torch.zeros_like(p[:, 0]).index_add_(0, slot_rows[listed_slots], p[slot_rows[listed_slots],
                                                                                      ids[listed_slots]])
        return {"topk.captured_mass": captured,
                "topk.kl_rest_bucket": kl_terms.sum(dim=1).clamp(min=0),
                "topk.tv_rest_bucket": 0.5 * (p - log_rec.exp()).abs().sum(dim=1)}

    def _sampled_figures(self, logp: torch.Tensor, sampled: SampledTargets, rows: slice, kind: str,
                         head: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor]:
        """The estimate p̂ is c / n on the drawn ids (n = the position's draws); with a `head` (ids, stored
        log-probs, tail) it is the head as stored plus r · c / n on the ids drawn from the tail."""
        offsets = sampled.offsets[rows.start:rows.start + logp.shape[0] + 1].to(logp.device)
        lengths = offsets.diff()
        span = slice(int(offsets[0]), int(offsets[-1]))
        row = torch.repeat_interleave(torch.arange(logp.shape[0], device=logp.device), lengths)
        counts = sampled.counts[span].to(logp.device).double()
        draws = torch.zeros(logp.shape[0], dtype=torch.float64, device=logp.device).index_add_(0, row, counts)
        estimate = counts / draws[row]  # the draws a position holds (a head-tail position may hold fewer than N)
        ids = sampled.ids[span].to(logp.device)
        if head is not None:
            head_ids, stored, tail = head
            listed = stored > float("-inf")
            estimate = torch.cat([stored[listed].double().exp(), estimate * tail.double().exp()[row]])
            row = torch.cat([torch.arange(logp.shape[0], device=logp.device).unsqueeze(1).expand_as(head_ids)[listed],
                             row])
            ids = torch.cat([head_ids[listed], ids])
            lengths = lengths + listed.sum(1)
        teacher_logp = logp[row, ids].double()
        mass = torch.zeros(logp.shape[0], dtype=torch.float64, device=logp.device).index_add_(0, row, teacher_logp.exp())
        renormalised = teacher_logp - mass.log()[row]
        kl = renormalised.exp() * (renormalised - estimate.log())
        deviation = (teacher_logp.exp() - estimate).abs()
        return {f"{kind}.captured_mass": mass,
                f"{kind}.kl_on_support": torch.zeros_like(mass).index_add_(0, row, kl).clamp(min=0),
                f"{kind}.tv": 0.5 * (torch.zeros_like(mass).index_add_(0, row, deviation) + 1 - mass),
                f"{kind}.distinct_ids": lengths}


def _select_positions(sampled: SampledTargets, positions: torch.Tensor) -> SampledTargets:
    """The ragged sampled targets of `positions` only (ascending indices)."""
    lengths = sampled.offsets.diff()
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    keep = torch.zeros(len(lengths), dtype=torch.bool, device=lengths.device)
    keep[positions.to(lengths.device)] = True
    kept = keep[owner]
    offsets = torch.cat([lengths.new_zeros(1), lengths[keep].cumsum(0)])
    return SampledTargets(ids=sampled.ids[kept], counts=sampled.counts[kept], offsets=offsets)
