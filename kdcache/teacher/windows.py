"""Which rows a dump computes together: the shard plan, windows of rows, length-sorted batches.

Shard i always holds rows [i·shard_rows, (i+1)·shard_rows), whatever the number of processes, so
an interrupted dump can be resumed shard by shard. Within a shard, rows are read a window at a
time, sorted by length and cut into batches: little padding, and batches that depend only on the
shard, so a shard's bytes do not depend on which process or run made it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..cache.format import OPTIONAL_COLUMNS
from ..errors import KDCacheError
from ..tasks import Annotation, Task
from .settings import DumpSettings

# Rows are sorted by length within windows of this many batches, so batches carry little padding
# while the rows of a window (written in sample-id order) stay a bounded amount of host memory.
WINDOW_BATCHES = 16

# (sample ids, token id lists, annotations or None) of one teacher batch.
Batch = tuple[list[int], list[list[int]], list[Annotation] | None]


def plan_shards(num_rows: int, shard_rows: int) -> list[range]:
    """Shard i holds rows [i·shard_rows, (i+1)·shard_rows): fixed, whatever the number of processes."""
    return [range(start, min(start + shard_rows, num_rows)) for start in range(0, num_rows, shard_rows)]


@dataclasses.dataclass
class RowSource:
    """Where a dump's rows come from and the task that turns them into tokens."""

    task: Task
    rows: Any  # a datasets.Dataset
    tokenizer: Any
    classes: list[str]
    source: str


def window_items(source: RowSource, start: int, stop: int, settings: DumpSettings
                 ) -> list[tuple[int, list[int], Annotation | None]]:
    """(sample id, token ids, annotation) of rows [start, stop) that have something to target.

    The task tokenizes the whole window as one of its batches.
    """
    window = dataclasses.replace(settings, batch_size=stop - start)
    items = []
    for sample_ids, token_lists, annotations in source.task.batches(
            source.rows, range(start, stop), source.tokenizer, source.classes, window, source.source):
        items += zip(sample_ids, token_lists, annotations or [None] * len(sample_ids))
    return items


def windows(source: RowSource, shard: range, settings: DumpSettings) -> Iterator[tuple[list[Batch], int]]:
    """Yield (batches, rows covered) per window of a planned shard; tokenization happens here, lazily.

    Within a window, rows with a target are sorted longest first (ties by sample id) and cut into
    batches: little padding, the out-of-memory case shows on the first batch, and the batches
    depend only on the shard.
    """
    window_rows = settings.batch_size * WINDOW_BATCHES
    for start in range(shard.start, shard.stop, window_rows):
        stop = min(start + window_rows, shard.stop)
        kept = sorted(window_items(source, start, stop, settings), key=lambda item: (-len(item[1]), item[0]))
        batches = []
        for first in range(0, len(kept), settings.batch_size):
            sample_ids, token_lists, annotations = map(list, zip(*kept[first:first + settings.batch_size]))
            batches.append((sample_ids, token_lists, None if annotations[0] is None else annotations))
        yield batches, stop - start


def optional_columns(source: RowSource, settings: DumpSettings) -> tuple[str, ...]:
    """The optional columns (labels, token types, target positions) the task's rows carry.

    Read off the first row with a target, before the output directory is touched, so data errors
    surface early and every process's shards share one schema.
    """
    if source.task.classes_are_vocabulary:  # a causal LM: only packed rows carry anything
        return ("position_ids",) if {"input_ids", "position_ids"} <= set(source.rows.column_names) else ()
    window_rows = settings.batch_size * WINDOW_BATCHES
    for start in range(0, len(source.rows), window_rows):
        items = window_items(source, start, min(start + window_rows, len(source.rows)), settings)
        if items:
            return tuple(name for name in OPTIONAL_COLUMNS if getattr(items[0][2], name) is not None)
    raise KDCacheError(f"dataset {source.source} has no row with anything to classify")


def pad_batch(token_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask [B, L] on `device`."""
    length = max(len(ids) for ids in token_lists)
    input_ids = torch.zeros(len(token_lists), length, dtype=torch.long)
    mask = torch.zeros(len(token_lists), length, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return input_ids.to(device), mask.to(device)
