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

    def merge(self, other: StreamingSummary) -> None:
        """Add another summary's values: per-shard summaries combine into the cache's."""
        self.counts += other.counts
        self.total += other.total
        self.count += other.count

    def state(self) -> dict:
        """JSON-able state, so a finished shard's statistics survive a restart of the dump."""
        return {"counts": self.counts.tolist(), "total": self.total, "count": self.count}

    @classmethod
    def from_state(cls, state: dict) -> StreamingSummary:
        summary = cls(bins=len(state["counts"]))
        summary.counts = np.asarray(state["counts"], dtype=np.int64)
        summary.total, summary.count = float(state["total"]), int(state["count"])
        return summary

    def percentile(self, q: float) -> float:
        if self.count == 0:
            return float("nan")
        rank = np.searchsorted(np.cumsum(self.counts), q / 100 * self.count, side="left")
        return (rank + 0.5) / len(self.counts)

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else float("nan")
        return {"mean": round(mean, 6), **{f"p{q}": round(self.percentile(q), 4) for q in (1, 5, 50, 95)}}
