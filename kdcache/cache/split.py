"""A deterministic held-out part of a cache, chosen by sample id: the same for training and eval.

Sequences are ordered by a hash of their sample id and the last `ceil(fraction · rows)` of that
order are held out. The hash (not the raw id) matters: datasets are often sorted by source or
topic, and the last rows of a file are rarely a fair sample. Only the sample ids decide, so
`train-student --val-fraction F` and `eval --split-fraction F` pick the same rows on any machine,
whatever the shard layout or batch size.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import KDCacheError


@dataclasses.dataclass(frozen=True)
class CacheSplit:
    train: frozenset[int]
    heldout: frozenset[int]


def _mix(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed, well-spread permutation of 64-bit integers."""
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_sample_ids(ids: np.ndarray, fraction: float, *, setting: str = "val_fraction") -> CacheSplit:
    """Hold out `fraction` of the sequences `ids` (at least one, never all); see `Cache.split`."""
    if not 0 < fraction < 1:
        raise KDCacheError(f"`{setting}` must be between 0 and 1 (exclusive), got {fraction}")
    heldout_count = math.ceil(fraction * len(ids))
    if heldout_count >= len(ids):
        raise KDCacheError(f"`{setting}` {fraction} would hold out all {len(ids)} sequences of the cache")
    order = np.lexsort((ids, _mix(ids)))
    return CacheSplit(train=frozenset(ids[order[:-heldout_count]].tolist()),
                      heldout=frozenset(ids[order[-heldout_count:]].tolist()))
