"""From cached sequences to padded tensors, and the flat views the losses take.

Losses work on [N, ...] tensors of valid positions only; `Batch.valid` selects them, so padding
never enters a loss or a mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from ..cache.cache import Cache
from ..cache.format import HIDDEN_PREFIX, POOLED_COLUMN, batch_dtype
from ..cache.writer import CachedSequence, Ragged
from ..errors import KDCacheError
from ..losses import SparseTargets
from ..tasks import CAUSAL_LM, pad_positions

T = TypeVar("T")


@dataclasses.dataclass
class Batch:
    """Padded model inputs and teacher targets of some cache rows (see `collate`)."""

    input_ids: torch.Tensor       # int64 [B, L], 0-padded
    attention_mask: torch.Tensor  # int64 [B, L]
    topk_ids: torch.Tensor | None = None        # int64 [B, L, k] (None: the cache holds no top-k targets)
    topk_logprobs: torch.Tensor | None = None   # float32 [B, L, k]
    tail_logprob: torch.Tensor | None = None    # float32 [B, L]
    hidden: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # teacher layer -> float32 [B, L, d]
    sampled_ids: torch.Tensor | None = None       # int64 [B, L, S], S = most distinct ids at any position
    sampled_logprobs: torch.Tensor | None = None  # float32 [B, L, S]: log(count / draws), -inf in padded slots
    target_mask: torch.Tensor | None = None     # bool [B, L]: positions holding a target (None: all valid)
    labels: torch.Tensor | None = None          # int64 [B, L]: gold class at target positions, else -100
    token_type_ids: torch.Tensor | None = None  # int64 [B, L], text pairs only
    pooled: torch.Tensor | None = None          # float32 [B, d], the teacher encoder's pooled output
    position_ids: torch.Tensor | None = None    # int64 [B, L], packed documents (padding: a document of its own)
    sample_ids: list[int] = dataclasses.field(default_factory=list)  # the cache rows, in batch order
    # a multi-teacher cache's other teachers read along (`Cache.sequences(teachers=...)`): their batches of the same rows
    teachers: dict[str, Batch] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.teachers = {name: Batch(**value) if isinstance(value, dict) else value
                         for name, value in self.teachers.items()}

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, as a plain dict: what a Hugging Face Trainer moves to its device
        (it recurses into dicts and lists), and `Batch(**as_dict())` rebuilds the batch."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["teachers"] = {name: batch.as_dict() for name, batch in self.teachers.items()}
        return {name: value for name, value in values.items() if value is not None}

    def to(self, device) -> Batch:
        moved = {name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                 for name, value in self.as_dict().items()}
        moved["hidden"] = {layer: value.to(device, non_blocking=True) for layer, value in self.hidden.items()}
        moved["teachers"] = {name: batch.to(device) for name, batch in self.teachers.items()}
        return Batch(**moved)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def targets_at(self) -> torch.Tensor:
        """Where the targets are: every valid position unless the cache says otherwise."""
        return self.valid if self.target_mask is None else self.target_mask

    def model_inputs(self) -> dict:
        """Packed rows give positions and no mask, so each document sees only itself (tasks/base.py)."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs

    def sparse_targets(self, kind: str = "topk") -> SparseTargets:
        """The loss's view of one target type: top-k with its exact tail, sampled (no tail), or head-tail.

        Head-tail is an unbiased estimate of the whole distribution, so it takes the sampled form: the
        head as stored, and r · count / draws on the ids drawn from the tail (r = the exact tail mass).
        """
        valid = self.targets_at
        if kind == "sampled":
            return SparseTargets(ids=self.sampled_ids[valid], logprobs=self.sampled_logprobs[valid], tail_logprob=None)
        if kind == "head-tail":
            drawn = self.tail_logprob[valid].unsqueeze(-1) + self.sampled_logprobs[valid]
            return SparseTargets(ids=torch.cat([self.topk_ids[valid], self.sampled_ids[valid]], -1),
                                 logprobs=torch.cat([self.topk_logprobs[valid], drawn], -1), tail_logprob=None)
        return SparseTargets(ids=self.topk_ids[valid], logprobs=self.topk_logprobs[valid],
                             tail_logprob=self.tail_logprob[valid])

    def next_token_labels(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Flat labels at `where` [B, L] (default: the target positions, every valid one unless the cache says
        otherwise): the following token, -100 at each sequence's and each packed document's end."""
        has_next = self.valid[:, 1:]
        if self.position_ids is not None:
            has_next = has_next & (self.position_ids[:, 1:] != 0)
        labels = torch.full_like(self.input_ids, -100)
        labels[:, :-1] = torch.where(has_next, self.input_ids[:, 1:], -100)
        return labels[self.targets_at if where is None else where]


def trained_targets(cache: Cache, requested: str | None) -> str:
    """The target type a student trains on (`Batch.sparse_targets`' kind): `requested`, else the cache's own.

    Refused where the cache cannot give it; train-student and cross-tokenizer collation both choose by
    this one rule, so they accept and refuse the same types with the same message.
    """
    manifest = cache.manifest
    targets = requested or manifest.default_targets
    if targets not in manifest.trainable_targets:
        remedy = (f"dump with `targets` {targets} or both" if manifest.task == CAUSAL_LM
                  else "classification caches hold top-k targets only")
        raise KDCacheError(f"`targets` {targets}: cache {cache} holds only {'/'.join(manifest.target_types)} "
                           f"targets ({remedy})")
    return targets


def _dtype(column: str) -> torch.dtype:
    """The dtype a batch holds `column` in: the format's one table (cache/format.py) decides."""
    return getattr(torch, batch_dtype(column))


def _stack_padded(arrays: list[np.ndarray], length: int, dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
    first = arrays[0]
    out = torch.full((len(arrays), length, *first.shape[1:]), fill, dtype=dtype)
    for row, values in enumerate(arrays):
        out[row, :len(values)] = torch.from_numpy(np.asarray(values).astype(np.float32 if dtype.is_floating_point
                                                                            else np.int64))
    return out


def _stack_ragged(ids: list[Ragged], counts: list[Ragged], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled targets as [B, L, S] ids and log(count / draws), padded slots at id 0 with log-prob -inf.

    Only causal-LM caches hold sampled targets (classification refuses them at dump time), so
    their positions are the tokens themselves. A position may hold no draws (a head-tail position
    whose head lists every id).
    """
    width = max(int(row.lengths().max(initial=0)) for row in ids)
    out_ids = torch.zeros(len(ids), length, width, dtype=torch.long)
    out_logprobs = torch.full((len(ids), length, width), float("-inf"))
    for row, (row_ids, row_counts) in enumerate(zip(ids, counts)):
        position, slot, logprobs = draw_estimates(row_ids, row_counts)
        out_ids[row, position, slot] = torch.from_numpy(row_ids.values.astype(np.int64))
        out_logprobs[row, position, slot] = torch.from_numpy(logprobs.astype(np.float32))
    return out_ids, out_logprobs


def draw_estimates(ids: Ragged, counts: Ragged) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each drawn id's position, its slot within the position, and log(count / n): the sampled estimate of its
    probability, n = the position's draws (Σ counts; N, or fewer for proportional head-tail draws)."""
    lengths = ids.lengths()
    position = np.repeat(np.arange(len(lengths)), lengths)
    slot = np.arange(len(ids.values)) - np.repeat(ids.offsets[:-1], lengths)
    count = counts.values.astype(np.float64)
    draws = np.bincount(position, weights=count, minlength=len(lengths))
    return position, slot, np.log(count / draws[position])


def _scatter(arrays: list[np.ndarray], where: torch.Tensor, dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
    """Per-row target arrays placed at the True entries of `where` [B, L] (row-major, as stored)."""
    flat = torch.from_numpy(np.concatenate(arrays).astype(np.float32 if dtype.is_floating_point else np.int64))
    out = torch.full((*where.shape, *flat.shape[1:]), fill, dtype=dtype)
    out[where] = flat
    return out


def collate(sequences: list[CachedSequence]) -> Batch:
    """Pad a list of sequences into one Batch; target types the cache lacks stay None."""
    length = max(len(sequence.input_ids) for sequence in sequences)
    lengths = torch.tensor([len(sequence.input_ids) for sequence in sequences])
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    first = sequences[0]
    target_mask = None
    if first.target_positions is not None:
        target_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
        for row, sequence in enumerate(sequences):
            target_mask[row, torch.from_numpy(sequence.target_positions.astype(np.int64))] = True
    where = mask.bool() if target_mask is None else target_mask

    def scattered(name: str, fill: float = 0) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        return _scatter([getattr(s, name) for s in sequences], where, _dtype(name), fill)

    sampled_ids = sampled_logprobs = None
    if first.sampled_ids is not None:
        sampled_ids, sampled_logprobs = _stack_ragged([s.sampled_ids for s in sequences],
                                                      [s.sampled_counts for s in sequences], length)
    return Batch(
        input_ids=_stack_padded([s.input_ids for s in sequences], length, _dtype("input_ids")),
        attention_mask=mask,
        topk_ids=scattered("topk_ids"),
        topk_logprobs=scattered("topk_logprobs"),
        tail_logprob=scattered("tail_logprob"),
        hidden={layer: _stack_padded([s.hidden[layer] for s in sequences], length, _dtype(HIDDEN_PREFIX))
                for layer in first.hidden},
        sampled_ids=sampled_ids,
        sampled_logprobs=sampled_logprobs,
        target_mask=target_mask,
        labels=scattered("labels", -100),
        token_type_ids=(None if first.token_type_ids is None
                        else _stack_padded([s.token_type_ids for s in sequences], length, _dtype("token_type_ids"))),
        pooled=(None if first.pooled is None
                else torch.from_numpy(np.concatenate([s.pooled for s in sequences])).to(_dtype(POOLED_COLUMN))),
        position_ids=(None if first.position_ids is None
                      else pad_positions([s.position_ids for s in sequences], length, "cpu")),
        sample_ids=[sequence.sample_id for sequence in sequences],
        teachers={name: collate([sequence.teachers[name] for sequence in sequences]) for name in first.teachers},
    )


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter): evaluation batches a stream."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
