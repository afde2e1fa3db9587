"""Streaming summary statistics for the manifest: constant memory for any number of tokens."""

from __future__ import annotations

import numpy as np


class StreamingSummary:
    """Mean and approximate percentiles of values in [0, 1] from a fixed 1000-bin histogram.

    Exact mean; percentiles to 0.001, which is what a reader of captured-mass figures needs.
    """

    def __init__(self, bins: int = 1000):
        self.counts = np.zeros(bins, dtype=np.int64)
        self.total = 0.0
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
        bins = len(self.counts)
        np.add.at(self.counts, np.minimum((values * bins).astype(np.int64), bins - 1), 1)
        self.total += float(values.sum())
        self.count += len(values)

    def percentile(self, q: float) -> float:
        if self.count == 0:
            return float("nan")
        rank = np.searchsorted(np.cumsum(self.counts), q / 100 * self.count, side="left")
        return (rank + 0.5) / len(self.counts)

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else float("nan")
        return {"mean": round(mean, 6), **{f"p{q}": round(self.percentile(q), 4) for q in (1, 5, 50, 95)}}
