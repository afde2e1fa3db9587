"""Summary statistics for the manifest: constant memory for any number of tokens, and combinable.

Both accumulators keep sums, not means, so the statistics of shards combine exactly into a cache's,
and those of caches into a merged cache's (`kdcache merge`) or a subset's (`kdcache copy --rows`).
They live in cache/ (numpy only) because the dump fills them and the cache tools combine them.
"""

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

    def summary(self, histogram_bins: int = 100) -> dict:
        """Mean, percentiles and the histogram in `histogram_bins` bins (for `kdcache info --plot`: a
        picture needs no finer grain than 100, and the manifest stays small)."""
        mean = self.total / self.count if self.count else float("nan")
        return {"mean": round(mean, 6), **{f"p{q}": round(self.percentile(q), 4) for q in (1, 5, 50, 95)},
                "histogram": self.counts.reshape(histogram_bins, -1).sum(axis=1).tolist()}


class FidelitySums:
    """The fidelity card's accumulators (see kdcache/teacher/fidelity.py for what each figure means).

    Sums of per-position figures over the measured positions; `summary()` gives the means stored in
    the manifest. The dump's `FidelityCard` adds the measuring; cache tools only combine states.
    """

    def __init__(self, target_types: tuple[str, ...], *, top_k: int, draws: int | None, every: int = 1):
        self.every = every
        self.target_types = target_types
        self.top_k = top_k
        self.draws = draws
        self.positions = 0
        self.sums: dict[str, dict[str, float]] = {kind: {} for kind in target_types}

    def add(self, figures: dict[str, np.ndarray]) -> None:
        """Sum the per-position `figures` ("fidelity.<kind>.<name>" -> values); NaN marks a position
        that was not measured."""
        for key, values in figures.items():
            _, kind, name = key.split(".")
            self.sums[kind][name] = self.sums[kind].get(name, 0.0) + float(np.nansum(values, dtype=np.float64))
        first = next(iter(figures.values()), np.zeros(0))
        self.positions += int(np.count_nonzero(~np.isnan(first)))

    def state(self) -> dict:
        """JSON-able accumulators, so a finished shard's card survives a restart of the dump."""
        return {"positions": self.positions, "sums": self.sums}

    def merge_state(self, state: dict) -> None:
        """Add the accumulators of another card's `state()`: per-shard cards combine into the cache's."""
        for kind, sums in state["sums"].items():
            for name, total in sums.items():
                self.sums[kind][name] = self.sums[kind].get(name, 0.0) + total
        self.positions += int(state["positions"])

    def summary(self) -> dict:
        card = {"positions": self.positions, "every": self.every}
        for kind, sums in self.sums.items():
            means = {name: round(total / max(self.positions, 1), 6) for name, total in sums.items()}
            shape = {"topk": {"top_k": self.top_k}, "sampled": {"draws": self.draws},
                     "head-tail": {"top_k": self.top_k, "draws": self.draws}}[kind]
            card[kind] = shape | means
        return card


def shard_stats(fidelity: dict, nll_sum: float, nll_count: int) -> dict:
    """A shard's entry in the manifest's `stats.shard_stats`: the sums only the dump could measure.

    The fidelity card and the teacher NLL need the teacher's full distribution, which the cache does
    not hold, so they cannot be recomputed later; keeping them per shard lets a cache made of some
    shards of others (a subset, a merge) state them exactly. The captured-mass histogram needs no
    such entry: it is recomputed from the stored tails.
    """
    return {"fidelity": fidelity, "nll_sum": nll_sum, "nll_count": nll_count}
