"""One process's batches across epochs, read and collated ahead of the training step.

Reading and collating run in one DataLoader worker process (when `prefetch` > 0) so they overlap
the student's forward and backward passes. The order of batches does not depend on the worker:
it is fixed by `Cache.sequences` (seed, epoch, world size), which is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..cache.cache import Cache
from .batching import Batch, collate


class CacheBatches(IterableDataset):
    """This process's batches as (epoch, batches of that epoch consumed so far, batch), starting after
    `start_batch` batches of `start_epoch`, until `epochs` epochs are done (None: forever), from `cache`
    (a subset reads only its rows).

    One iterable spans all epochs so that a single loader worker serves the whole run.
    """

    def __init__(self, cache: Cache, *, batch_size: int, seed: int, shuffle_buffer: int,
                 process_index: int, num_processes: int, hidden_layers: list[int], start_epoch: int = 0,
                 start_batch: int = 0, epochs: int | None = None, collate: Callable[[list], Batch] = collate,
                 teachers: tuple[str, ...] = ()):
        self.cache = cache
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.process_index, self.num_processes = process_index, num_processes
        self.hidden_layers = hidden_layers
        self.start_epoch, self.start_batch, self.epochs = start_epoch, start_batch, epochs
        self.collate = collate  # `CrossTokenizer.collate` across tokenizers
        self.teachers = teachers  # a multi-teacher cache's other teachers, read along

    def __iter__(self) -> Iterator[tuple[int, int, Batch]]:
        epoch, skip = self.start_epoch, self.start_batch
        while self.epochs is None or epoch < self.epochs:
            for consumed, batch in enumerate(self._epoch(epoch, skip), start=skip + 1):
                yield epoch, consumed, batch
            epoch, skip = epoch + 1, 0

    def _epoch(self, epoch: int, skip: int) -> Iterator[Batch]:
        pending = []
        for sequence in self.cache.sequences(hidden_layers=self.hidden_layers, shuffle=True, seed=self.seed,
                                             epoch=epoch, shuffle_buffer=self.shuffle_buffer,
                                             process_index=self.process_index, num_processes=self.num_processes,
                                             start=skip * self.batch_size, teachers=self.teachers):
            pending.append(sequence)
            if len(pending) == self.batch_size:
                yield self.collate(pending)
                pending = []
        if pending:
            yield self.collate(pending)


def prefetched(batches: CacheBatches, prefetch: int) -> Iterable[tuple[int, int, Batch]]:
    """`batches` itself when `prefetch` is 0, else a one-worker DataLoader keeping `prefetch` batches ready.

    The loader gets its own generator: a DataLoader otherwise draws its worker seed from the global
    torch RNG, which would shift the training RNG stream between a resumed and an uninterrupted run.
    """
    if prefetch <= 0:
        return batches
    return DataLoader(batches, batch_size=None, num_workers=1, prefetch_factor=prefetch,
                      generator=torch.Generator().manual_seed(0))
