"""The manifest statistics of a cache made of other caches' shards (a subset, a merge), combined exactly.

A derived cache must describe itself as truthfully as a dumped one, so nothing is averaged from
rounded figures. What the shards hold is recomputed from them: the captured-mass histogram (from the
stored tails: the dump summed exactly these float32 values), the target count and the content hash.
What only the dump could measure — the fidelity card and the teacher NLL, which need the teacher's
full distribution — is summed from the per-shard accumulators the dump keeps in `stats.shard_stats`.
A shard cut to some of its rows has no such accumulators (they cannot be split by row), so those two
figures then cover the whole shards only, and their `positions` / `teacher_nll_targets` say how many
target positions that is; a cache with no whole shard (a few rows of one shard) carries its source's
figures, marked `measured_on: source`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import Manifest, ShardInfo, column_groups
from .reader import content_sha256
from .stats import FidelitySums, StreamingSummary
from .store import CacheStore
from .validate import expected_schema, open_checked


def _target_counts(store: CacheStore, shard: ShardInfo, manifest: Manifest, captured: StreamingSummary) -> int:
    """Add the shard's captured masses to `captured` (top-k caches); return its number of target positions."""
    column = "tail_logprob" if "topk" in column_groups(manifest.target_types) else "sampled_counts"
    reader = open_checked(store, manifest, shard, fields=[expected_schema(manifest).get_field_index(column)])
    count = 0
    for index in range(reader.num_record_batches):
        values = reader.get_batch(index).column(column).flatten()
        count += len(values)
        if column == "tail_logprob":
            captured.add(-np.expm1(values.to_numpy(zero_copy_only=False)))
    return count


def derived_stats(cache_dir: Path | str, manifest: Manifest, shards: list[ShardInfo],
                  shard_stats: dict[str, dict], skipped_sample_ids: list[int]) -> dict:
    """`stats` of a new cache in `cache_dir` holding `shards`, with the target settings of `manifest`.

    `shard_stats` maps a shard file of the new cache to its dump accumulators (absent for shards cut
    to some of their rows).
    """
    store = CacheStore(cache_dir)
    settings = manifest.settings
    captured = StreamingSummary()
    card = FidelitySums(manifest.target_types, top_k=manifest.top_k,
                        draws=manifest.draws,
                        every=settings.get("fidelity_every", 1))
    targets = nll_count = 0
    nll_sum = 0.0
    kept = {}
    for shard in shards:
        targets += _target_counts(store, shard, manifest, captured)
        if shard.file in shard_stats:
            entry = kept[shard.file] = shard_stats[shard.file]
            card.merge_state(entry["fidelity"])
            nll_sum += entry["nll_sum"]
            nll_count += entry["nll_count"]
    # no whole shard: the source's figures, marked as measured on the source (the best estimate there is)
    source = manifest.stats
    fidelity = card.summary() if card.positions else (
        {**source["fidelity"], "measured_on": "source"} if source.get("fidelity") else None)
    return {"tokens": targets,
            "fidelity": fidelity,
            **({"captured_mass": captured.summary()} if "topk" in column_groups(manifest.target_types) else {}),
            "teacher_nll": (round(nll_sum / nll_count, 6) if nll_count else source.get("teacher_nll")),
            "teacher_nll_targets": nll_count if nll_count else source.get("teacher_nll_targets"),
            **({} if nll_count or source.get("teacher_nll") is None else {"teacher_nll_measured_on": "source"}),
            "content_sha256": content_sha256(store, manifest, shards),
            "skipped_sample_ids": sorted(skipped_sample_ids),
            "shard_stats": kept}
