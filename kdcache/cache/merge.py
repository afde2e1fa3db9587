"""`kdcache merge`: one cache from caches of the same teacher, tokenizer and target settings.

Teams dump different data (or different slices of it) with the same teacher; a student should
train on all of it as one cache. Merging never re-encodes a target:

- **Compatibility** is checked first, on everything a student relies on: task and labels, the
  teacher's weights and config hashes, the tokenizer's hash and size, the target columns and their
  types (top-k size, log-prob dtype, sampled draws, hidden layers). Anything else may differ (data,
  batch size, number of processes); each source's own settings stay in its `sources` entry.
- **Sample ids** must stay unique. When the sources' ids are already disjoint (e.g. caches cut from
  one dump) they are kept and every shard is hard-linked (or copied across file systems). When they
  collide — two dumps of different data both count from 0 — source j's ids are shifted by an
  offset past the previous sources' ids, which means its shards are rewritten: the same record
  batches with a new `sample_id` column, the targets copied as they are. `sources[j]` records the
  offset and the original id range, so every row is traceable to its cache and original id.
- **Statistics** are combined exactly (kdcache/cache/combine.py): the dump accumulators of each
  shard carry over, the rest is recomputed from the merged shards.

Merged shards keep their source's dump fingerprint in their metadata; the merged manifest lists
those fingerprints (`sources[j].shard_fingerprints`) so verification knows them.
"""

from __future__ import annotations

import datetime
import json
import os
import posixpath
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .. import __version__
from ..errors import KDCacheError
from .card import CARD_NAME, render_card
from .combine import derived_stats
from .format import DATA_DIR, Manifest, ShardInfo, sha256_file, sha256_json
from .reader import shard_sample_ids
from .safety import check_relative, contained_file
from .store import CacheStore
from .transfer import Destination, copy_tokenizer, fetch_shard, rewrite_shard


def _compatibility(manifest: Manifest) -> dict[str, object]:
    """What must be equal for two caches' rows to be targets of the same kind, by a readable name."""
    settings = manifest.settings
    return {"task": manifest.task, "labels": manifest.labels,
            "teacher weights (weights_sha256)": manifest.teacher.get("weights_sha256"),
            "teacher config (config_sha256)": manifest.teacher.get("config_sha256"),
            "tokenizer (hash)": manifest.tokenizer.get("hash"), "tokenizer size": manifest.vocab_size,
            "target types": list(manifest.target_types), "top_k": settings.get("top_k"),
            "logprob_dtype": settings.get("logprob_dtype"),
            "columns": manifest.columns | {"codec": {key: value for key, value in manifest.columns.get("codec", {}).items()
                                                     if key != "id_ranking"}},
            # each recode ranks by its own cache's ids: merge first, then recode (or recode with --no-rank-ids)
            "id ranking (merge before `recode`)": list(manifest.codec.id_ranking),
            "samples": manifest.draws,  # head-tail's draws too
            "sampling": settings.get("sampling", "independent") if manifest.draws else None,
            "format_version": manifest.format_version}


def check_mergeable(locations: list[str], manifests: list[Manifest]) -> None:
    """Refuse caches that differ in anything a student relies on, naming each difference."""
    first = _compatibility(manifests[0])
    differences = []
    for location, manifest in zip(locations[1:], manifests[1:]):
        other = _compatibility(manifest)
        differences += [f"{name} ({json.dumps(first[name])[:40]} in {locations[0]}, "
                        f"{json.dumps(other[name])[:40]} in {location})"
                        for name in first if other[name] != first[name]]
    if differences:
        raise KDCacheError("cannot merge caches of different teachers, tokenizers or target settings: they differ in "
                           + "; ".join(differences))


def _id_offsets(ids: list[np.ndarray]) -> list[int]:
    """0 for every source when their ids are disjoint; otherwise each source starts past the previous ones."""
    every = np.concatenate(ids)
    if len(np.unique(every)) == len(every):
        return [0] * len(ids)
    offsets, end = [], 0
    for source_ids in ids:
        offset = end - int(source_ids.min()) if len(source_ids) else end
        offsets.append(offset)
        end = int(source_ids.max()) + offset + 1 if len(source_ids) else end
    return offsets


def _stage(store: CacheStore, shard: ShardInfo, staged: Path, bar: tqdm) -> None:
    """Put a verified copy of a source shard at `staged`: a hard link to a local source, else a download."""
    if not store.remote:
        path = contained_file(Path(str(store)), shard.file)
        if path is not None and path.stat().st_size == shard.bytes and sha256_file(path) == shard.sha256:
            try:
                os.link(path, staged)
                bar.update(shard.bytes)
                return
            except OSError:
                pass  # another file system: copy it (and check it again on the way)
    fetch_shard(store, shard, staged, bar)


def _shift_ids(offset: int):
    def edit(batch: pa.RecordBatch, first: int) -> pa.RecordBatch:
        ids = batch.column(0).to_numpy() + np.int64(offset)
        return batch.set_column(0, batch.schema.field(0), pa.array(ids, type=pa.int64()))
    return edit


def merge_caches(locations: list[str | Path], out: Path | str, *, progress: bool = True) -> Manifest:
    """Merge the caches at `locations` (directories or URLs) into the new local cache directory `out`."""
    if len(locations) < 2:
        raise KDCacheError("`caches`: merging needs at least two caches")
    stores = [CacheStore(str(location).rstrip("/")) for location in locations]
    locations = [str(store) for store in stores]  # as recorded and shown: credentials redacted
    manifests = [store.load_manifest() for store in stores]
    for manifest in manifests:
        for shard in manifest.shards:
            check_relative(shard.file, "shard", under=DATA_DIR)
    for location, manifest in zip(locations, manifests):
        if manifest.teachers:
            raise KDCacheError(f"cache {location} has several teachers: merge each teacher's caches (CACHE/teachers/"
                               f"<name> is one) and join the merged caches with `merge --teachers`")
    check_mergeable(locations, manifests)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KDCacheError(f"`out` {out} exists and is not empty")
    ids = [np.concatenate(shard_sample_ids(store, manifest)) for store, manifest in zip(stores, manifests)]
    offsets = _id_offsets(ids)
    target = Destination(out)
    try:
        return _merge_into(target, out, locations, stores, manifests, ids, offsets, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # `out` was empty or absent: leave nothing half-written
        raise


def _merge_into(target: Destination, out: Path, locations: list[str], stores: list[CacheStore],
                manifests: list[Manifest], ids: list[np.ndarray], offsets: list[int], progress: bool) -> Manifest:
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(manifest.total_bytes for manifest in manifests), desc="merge", unit="B", unit_scale=True,
               disable=not progress)
    shards, shard_stats, skipped, sources = [], {}, [], []
    with bar:
        for index, (location, store, manifest, offset) in enumerate(zip(locations, stores, manifests, offsets)):
            names = []
            for shard in manifest.shards:
                relative = f"{DATA_DIR}/part-{index:03d}-{posixpath.basename(shard.file)}"
                with target.staging(relative) as staged, target.staging(relative + ".source") as source:
                    _stage(store, shard, source, bar)
                    if offset:
                        merged = rewrite_shard(source, staged, relative, _shift_ids(offset), manifest, shard)
                    else:
                        os.replace(source, staged)
                        merged = ShardInfo(relative, shard.rows, shard.tokens, shard.bytes, shard.sha256,
                                           shard.batch_sha256)
                    target.publish(staged, relative)
                shards.append(merged)
                names.append(relative)
                if shard.file in manifest.stats.get("shard_stats", {}):
                    shard_stats[relative] = manifest.stats["shard_stats"][shard.file]
            skipped += [sample_id + offset for sample_id in manifest.stats.get("skipped_sample_ids", [])]
            sources.append({"location": location, "dump_fingerprint": manifest.dump_fingerprint,
                            "content_sha256": manifest.stats.get("content_sha256"), "dataset": manifest.dataset,
                            "settings": manifest.settings, "teacher": manifest.teacher.get("name_or_path"),
                            "rows": manifest.total_rows, "id_offset": offset,
                            "sample_ids": [int(ids[index].min()), int(ids[index].max())] if len(ids[index]) else [],
                            "shards": names, "shard_fingerprints": sorted(manifest.shard_fingerprints),
                            "sources": manifest.sources})
    copy_tokenizer(stores[0], manifests[0], target)
    base = manifests[0]
    datasets = [manifest.dataset for manifest in manifests]
    merged = Manifest(
        task=base.task, teacher=base.teacher, tokenizer=base.tokenizer,
        dataset={"source": " + ".join(str(dataset.get("source")) for dataset in datasets),
                 "split": " + ".join(str(dataset.get("split")) for dataset in datasets),
                 "text_column": base.dataset.get("text_column"),
                 "num_rows": sum(int(dataset.get("num_rows") or 0) for dataset in datasets),
                 "rows_dumped": sum(shard.rows for shard in shards),
                 "fingerprint": sha256_json([dataset.get("fingerprint") for dataset in datasets])},
        settings=base.settings, columns=base.columns,
        dump_fingerprint=sha256_json({"merge": [manifest.dump_fingerprint for manifest in manifests],
                                      "id_offsets": offsets}),
        shards=shards, kdcache_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        labels=base.labels, sources=sources)
    merged.stats = derived_stats(out, merged, shards, shard_stats, skipped)  # reads the shards as the merged cache
    target.write_text(CARD_NAME, render_card(merged, str(out)))
    merged.save(out)
    return merged
