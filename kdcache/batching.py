"""From cached sequences to padded tensors, and the flat views the losses take.

Losses work on [N, ...] tensors of valid positions only; `Batch.valid` selects them, so padding
never enters a loss or a mean.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .cache.writer import CachedSequence
from .losses import SparseTargets


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor       # int64 [B, L], 0-padded
    attention_mask: torch.Tensor  # int64 [B, L]
    topk_ids: torch.Tensor        # int64 [B, L, k]
    topk_logprobs: torch.Tensor   # float32 [B, L, k]
    tail_logprob: torch.Tensor    # float32 [B, L]
    hidden: dict[int, torch.Tensor]  # teacher layer -> float32 [B, L, d]
    sample_ids: list[int] = dataclasses.field(default_factory=list)  # the cache rows, in batch order

    def to(self, device) -> Batch:
        moved = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        moved = {name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                 for name, value in moved.items()}
        moved["hidden"] = {layer: value.to(device, non_blocking=True) for layer, value in self.hidden.items()}
        return Batch(**moved)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def sparse_targets(self) -> SparseTargets:
        valid = self.valid
        return SparseTargets(ids=self.topk_ids[valid], logprobs=self.topk_logprobs[valid],
                             tail_logprob=self.tail_logprob[valid])

    def next_token_labels(self) -> torch.Tensor:
        """Flat labels for valid positions: the following token, -100 at each sequence's end."""
        labels = torch.full_like(self.input_ids, -100)
        labels[:, :-1] = torch.where(self.valid[:, 1:], self.input_ids[:, 1:], -100)
        return labels[self.valid]


def _stack_padded(arrays: list[np.ndarray], length: int, dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
    first = arrays[0]
    out = torch.full((len(arrays), length, *first.shape[1:]), fill, dtype=dtype)
    for row, values in enumerate(arrays):
        out[row, :len(values)] = torch.from_numpy(np.asarray(values).astype(np.float32 if dtype.is_floating_point
                                                                            else np.int64))
    return out


def collate(sequences: list[CachedSequence]) -> Batch:
    length = max(len(sequence.input_ids) for sequence in sequences)
    lengths = torch.tensor([len(sequence.input_ids) for sequence in sequences])
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return Batch(
        input_ids=_stack_padded([s.input_ids for s in sequences], length, torch.long),
        attention_mask=mask,
        topk_ids=_stack_padded([s.topk_ids for s in sequences], length, torch.long),
        topk_logprobs=_stack_padded([s.topk_logprobs for s in sequences], length, torch.float32),
        tail_logprob=_stack_padded([s.tail_logprob for s in sequences], length, torch.float32),
        hidden={layer: _stack_padded([s.hidden[layer] for s in sequences], length, torch.float32)
                for layer in sequences[0].hidden},
        sample_ids=[sequence.sample_id for sequence in sequences],
    )
