"""Publishing and fetching caches: `kdcache copy SRC DST` between any two fsspec locations.

One copy function serves both directions (push: local → URL, pull: URL → local, and URL → URL), so
publishing and fetching share every guarantee:

- **Manifest last.** Shards, then the tokenizer, then the card, then `kdcache.json`: a reader (which
  treats a cache as complete exactly when its manifest exists) never sees a half-published cache.
- **Verified on arrival.** Every shard is streamed into a staging file while it is hashed; only a
  shard with the manifest's size and sha256 is published under its final name, so a corrupt or
  truncated source is a one-line error and leaves nothing at the final name. A local destination
  publishes by rename; an object store (s3, gs) publishes an object whole when its upload completes.
- **Resumable.** A rerun skips shards already at the destination with the right size and sha256
  (read back, for a remote destination), so an interrupted copy costs only what was not finished.
  `kdcache.copy.json` marks an unfinished copy: a destination holding anything else is refused.
- **Subsets.** `shards`, `rows` (the first N in shard order) or `sample_ids` select part of a cache;
  whole shards are copied as they are, a shard needing only some rows is cut into a new Arrow file
  (the same values, fewer rows), and the subset gets its own manifest: new totals, statistics
  combined exactly (kdcache/cache/combine.py), a new content hash, and a `sources` entry naming the
  cache and selection it came from, so it verifies like any cache.

Every path a manifest names is checked before it is used (relative, normalised, inside the cache),
so a hostile manifest cannot make a copy write outside its destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import posixpath
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .. import __version__
from ..errors import KDCacheError
from .cache import Cache
from .card import CARD_NAME, render_card
from .combine import derived_stats
from .format import (
    DATA_DIR,
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    TOKENIZER_DIR,
    Manifest,
    ShardInfo,
    sha256_file,
    sha256_json,
)
from .reader import shard_sample_ids
from .safety import (
    MAX_CARD_BYTES,
    MAX_MANIFEST_BYTES,
    check_relative,
    copy_capped,
    copy_contained,
    printable,
    redact_url,
    tokenizer_file_limit,
)
from .store import CacheStore, is_url
from .validate import CheckedShard, batch_digests

COPY_MARKER = "kdcache.copy.json"


class Destination:
    """Where a copy writes: a local directory (files published by atomic rename) or an fsspec URL."""

    def __init__(self, location: str | Path):
        self.location = str(location).rstrip("/")
        self.remote = is_url(self.location)
        if self.remote:
            self.fs = fsspec.filesystem(self.location.split("://", 1)[0])
            self.fs.invalidate_cache()  # another process may have changed it since this process last looked

    def __str__(self) -> str:
        return redact_url(self.location)

    def _local(self, relative: str) -> Path:
        return Path(self.location) / relative

    def _url(self, relative: str) -> str:
        return f"{self}/{relative}"

    def _guard(self, action, relative: str):
        try:
            return action()
        except OSError as error:
            raise KDCacheError(f"cannot write {relative} to {self}: {error.strerror or error}") from None

    def names(self) -> list[str]:
        """The names at the top of the destination (none when it does not exist yet)."""
        if not self.remote:
            path = Path(self.location)
            if path.exists() and not path.is_dir():
                raise KDCacheError(f"destination {self} exists and is not a directory")
            return sorted(os.listdir(path)) if path.is_dir() else []
        try:
            return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.location, detail=False))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise KDCacheError(f"cannot read destination {self}: {error}") from None

    @contextlib.contextmanager
    def staging(self, relative: str) -> Iterator[Path]:
        """A local file to assemble `relative` in before publishing it; removed afterwards if still there."""
        if self.remote:
            with tempfile.TemporaryDirectory(prefix="kdcache-copy-") as directory:
                yield Path(directory) / posixpath.basename(relative)
            return
        path = self._local(relative + PARTIAL_SUFFIX)
        self._guard(lambda: path.parent.mkdir(parents=True, exist_ok=True), relative)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def publish(self, staged: Path, relative: str) -> None:
        """Put a complete staged file at its final name in one step."""
        if self.remote:
            self._guard(lambda: self.fs.put_file(str(staged), self._url(relative)), relative)
        else:
            self._guard(lambda: os.replace(staged, self._local(relative)), relative)

    def write_text(self, relative: str, text: str) -> None:
        with self.staging(relative) as staged:
            staged.write_text(text)
            self.publish(staged, relative)

    def remove(self, relative: str) -> None:
        if self.remote:
            self._guard(lambda: self.fs.rm_file(self._url(relative)), relative)
        else:
            self._local(relative).unlink(missing_ok=True)


@dataclasses.dataclass
class CopyReport:
    """What a copy did: the manifest it published, the shards it moved and those already there."""

    destination: str
    manifest: Manifest
    copied: list[str]
    skipped: list[str]
    bytes_copied: int


@dataclasses.dataclass
class _Planned:
    shard: ShardInfo
    rows: np.ndarray | None  # ascending row numbers to keep; None = the whole shard


def _plan(store: CacheStore, manifest: Manifest, shards: Sequence[int] | None, rows: int | None,
          sample_ids: Collection[int] | None) -> tuple[list[_Planned], dict | None]:
    """The shards (or parts of shards) to copy, and the selection as recorded in a subset's manifest."""
    if sum(option is not None for option in (shards, rows, sample_ids)) > 1:
        raise KDCacheError("choose one of `shards`, `rows` and `sample_ids`")
    count = len(manifest.shards)
    if shards is not None:
        wanted = sorted(set(shards))
        outside = [index for index in wanted if not 0 <= index < count]
        if outside or not wanted:
            raise KDCacheError(f"`shards` must be shard numbers from 0 to {count - 1}, got {list(shards)}")
        return [_Planned(manifest.shards[index], None) for index in wanted], {"shards": wanted}
    if rows is not None:
        if rows <= 0:
            raise KDCacheError(f"`rows` must be positive, got {rows}")
        plan, left = [], rows
        for shard in manifest.shards:
            if left <= 0:
                break
            plan.append(_Planned(shard, None if shard.rows <= left else np.arange(left)))
            left -= shard.rows
        return plan, ({"rows": rows} if rows < manifest.total_rows else None)
    if sample_ids is not None:
        wanted_ids = np.unique(np.fromiter(sample_ids, dtype=np.int64))
        plan, found = [], 0
        for shard, ids in zip(manifest.shards, shard_sample_ids(store, manifest)):
            kept = np.flatnonzero(np.isin(ids, wanted_ids))
            found += len(kept)
            if len(kept):
                plan.append(_Planned(shard, None if len(kept) == shard.rows else kept))
        if found < len(wanted_ids):
            missing = np.setdiff1d(wanted_ids, np.concatenate(shard_sample_ids(store, manifest)))
            raise KDCacheError(f"{len(missing)} of the `sample_ids` are not in cache {store} "
                               f"(first: {missing[:5].tolist()})")
        return plan, {"sample_ids_sha256": sha256_json(wanted_ids.tolist()), "sample_ids": len(wanted_ids)}
    return [_Planned(shard, None) for shard in manifest.shards], None


def fetch_shard(store: CacheStore, shard: ShardInfo, target: Path, bar: tqdm) -> None:
    """Stream a source shard into `target` while hashing it, stopping at the first byte beyond its declared
    size; raise unless size and sha256 match."""
    try:
        with store.open_file(shard.file) as source, open(target, "wb") as sink:
            digest = copy_capped(source, sink, shard.bytes, f"{shard.file} from {store}", bar.update)
        size = target.stat().st_size
    except FileNotFoundError:
        raise KDCacheError(f"{shard.file} disappeared from {store} during the copy") from None
    except OSError as error:
        raise KDCacheError(f"cannot copy {shard.file} from {store}: {error}") from None
    if size != shard.bytes or digest != shard.sha256:
        raise KDCacheError(f"{shard.file} from {store} fails its check ({size} bytes, the manifest says "
                           f"{shard.bytes}; sha256 {'matches' if digest == shard.sha256 else 'differs'}): "
                           f"the source is corrupt or was modified; nothing was kept")


def rewrite_shard(whole: Path, target: Path, relative: str,
                  edit: Callable[[pa.RecordBatch, int], pa.RecordBatch | None], manifest: Manifest,
                  shard: ShardInfo) -> ShardInfo:
    """Write the shard file `whole` to `target` batch by batch through `edit(batch, first_row)` (None
    drops the batch), with the same schema, metadata and buffer compression: the stored values are copied
    as they are, so a subset or an id change never re-encodes the targets."""
    # `whole` is `shard` of the cache `manifest` describes (fetched, its sha256 checked): read it checked
    reader = CheckedShard(pa.memory_map(str(whole), "r"), manifest, shard, remote=False)
    rows = tokens = first = 0
    # the source's codec and compression: a subset is the same cache, only smaller
    with pa.OSFile(str(target), "wb") as sink, \
            pa.ipc.new_file(sink, reader.schema, options=manifest.codec.write_options()) as writer:
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            edited = edit(batch, first)
            first += batch.num_rows
            if edited is not None and edited.num_rows:
                writer.write_batch(edited)
                rows += edited.num_rows
                tokens += len(edited.column("input_ids").flatten())
    return ShardInfo(file=relative, rows=rows, tokens=tokens, bytes=target.stat().st_size, sha256=sha256_file(target),
                     batch_sha256=batch_digests(target))


def _keep_rows(rows: np.ndarray) -> Callable[[pa.RecordBatch, int], pa.RecordBatch]:
    """An `edit` keeping the shard rows `rows` (ascending row numbers of the whole shard)."""
    def edit(batch: pa.RecordBatch, first: int) -> pa.RecordBatch:
        return batch.take(pa.array(rows[(rows >= first) & (rows < first + batch.num_rows)] - first))
    return edit


def _same_shard(store: CacheStore, shard: ShardInfo) -> bool:
    return store.size(shard.file) == shard.bytes and store.sha256(shard) == shard.sha256


def _check_destination(destination: Destination, existing: CacheStore, identity: dict, full_manifest: Manifest,
                       subset: bool) -> bool:
    """Refuse a destination holding anything but this copy; return whether it is an unfinished copy."""
    names = destination.names()
    if MANIFEST_NAME in names:
        manifest = existing.load_manifest()
        same = (manifest.sources[:1] and {key: manifest.sources[0].get(key) for key in identity} == identity
                if subset else manifest.to_dict() == full_manifest.to_dict())
        if not same:
            raise KDCacheError(f"{destination} already holds a different cache; choose another destination "
                               f"or delete it")
        return False
    if COPY_MARKER in names:
        try:
            with existing.open_file(COPY_MARKER) as handle:
                previous = json.loads(handle.read())
        except ValueError:
            previous = None
        if previous != identity:
            raise KDCacheError(f"{destination} holds an unfinished copy of another cache or selection; rerun "
                               f"that copy to finish it, or choose another destination")
        return True
    if names:
        raise KDCacheError(f"destination {destination} is not empty and holds no kdcache cache")
    return False


def copy_cache(source: str | Path, destination: str | Path, *, shards: Sequence[int] | None = None,
               rows: int | None = None, sample_ids: Collection[int] | None = None, workers: int = 8,
               progress: bool = True, on_file: Callable[[str], None] | None = None) -> CopyReport:
    """Copy the cache at `source` to `destination` (local directories or fsspec URLs), all of it or a subset.

    `on_file(relative_path)` is called after each file is published at the destination (shards,
    tokenizer files, card, manifest); an exception it raises stops the copy as a failure would.
    """
    if workers < 1:
        raise KDCacheError(f"`workers` must be positive, got {workers}")
    store = CacheStore(source)
    manifest = store.load_manifest()
    for shard in manifest.shards:
        check_relative(shard.file, "shard", under=DATA_DIR)
    plan, selection = _plan(store, manifest, shards, rows, sample_ids)
    subset = selection is not None
    if subset and manifest.teachers:
        raise KDCacheError(f"cache {source} has several teachers: copy it whole, or copy a selection of each "
                           f"teacher's cache (its teachers/<name>) and join them with `merge --teachers`")
    identity = {"dump_fingerprint": manifest.dump_fingerprint,
                "content_sha256": manifest.stats.get("content_sha256"), "selection": selection}
    target = Destination(destination)
    existing = CacheStore(destination)
    if not _check_destination(target, existing, identity, manifest, subset) and MANIFEST_NAME not in target.names():
        target.write_text(COPY_MARKER, json.dumps(identity, indent=2) + "\n")
    notify = on_file or (lambda relative: None)

    bar = tqdm(total=sum(item.shard.bytes for item in plan), desc="copy", unit="B", unit_scale=True,
               disable=not progress)
    copied, skipped = [], []

    stopped = threading.Event()  # set by the first failure: shards not yet started are not started

    def transfer(item: _Planned) -> ShardInfo | None:
        if stopped.is_set():
            return None
        try:
            return transfer_one(item)
        except BaseException:
            stopped.set()
            raise

    def transfer_one(item: _Planned) -> ShardInfo:
        shard = item.shard
        if item.rows is None and _same_shard(existing, shard):
            bar.update(shard.bytes)
            skipped.append(shard.file)
            return shard
        with target.staging(shard.file) as staged:
            if item.rows is None:
                fetch_shard(store, shard, staged, bar)
                result = shard
            else:
                with tempfile.TemporaryDirectory(prefix="kdcache-cut-") as directory:
                    whole = Path(directory) / "whole"
                    fetch_shard(store, shard, whole, bar)
                    result = rewrite_shard(whole, staged, shard.file, _keep_rows(item.rows), manifest, shard)
            target.publish(staged, shard.file)
        copied.append(shard.file)
        notify(shard.file)
        return result

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(transfer, item) for item in plan]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((future for future in futures if future in done and future.exception()), None)
            if failed is not None:
                raise failed.exception()
            new_shards = [future.result() for future in futures]
    finally:
        bar.close()

    copy_tokenizer(store, manifest, target, notify)
    for entry in manifest.teachers[1:]:  # a multi-teacher cache: each other teacher's cache, before the manifest
        store.teacher(entry["path"], entry["manifest_sha256"])  # refused if it is not the one the manifest records
        copy_cache(f"{store.location}/{entry['path']}", f"{target.location}/{entry['path']}", workers=workers,
                   progress=progress, on_file=lambda relative, path=entry["path"]: notify(f"{path}/{relative}"))
    if subset:
        published = _subset_manifest(manifest, new_shards, target, store, identity)
        manifest_text = json.dumps(published.to_dict(), indent=2) + "\n"
    else:  # byte for byte: fields a newer kdcache added survive the copy
        published, manifest_text = manifest, _read_text(store, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    card = (_read_text(store, CARD_NAME, MAX_CARD_BYTES) if not subset and store.size(CARD_NAME) is not None
            else render_card(published, str(target)))
    target.write_text(CARD_NAME, card)
    notify(CARD_NAME)
    target.write_text(MANIFEST_NAME, manifest_text)
    notify(MANIFEST_NAME)
    target.remove(COPY_MARKER)
    return CopyReport(destination=str(target), manifest=published, copied=sorted(copied), skipped=sorted(skipped),
                      bytes_copied=sum(shard.bytes for shard in new_shards if shard.file in copied))


def copy_tokenizer(store: CacheStore, manifest: Manifest, target: Destination,
                   notify: Callable[[str], None] = lambda relative: None) -> None:
    """Publish the cache's tokenizer files (checked against the manifest's sha256 of each) at `target`, one by
    one through `safety.copy_contained`: each file is opened without following symlinks and hashed again as it
    is copied, so a file swapped after the check is refused, not copied."""
    directory = Cache(store, manifest).tokenizer_dir()
    expected = manifest.tokenizer.get("files", {})
    for name in sorted(entry.name for entry in directory.iterdir()):
        relative = check_relative(f"{TOKENIZER_DIR}/{name}", "tokenizer file", under=TOKENIZER_DIR)
        if expected and name not in expected:
            raise KDCacheError(f"tokenizer file {printable(name)} appeared after the tokenizer was checked: refused")
        with target.staging(relative) as staged:
            copy_contained(directory, name, staged, expected.get(name), tokenizer_file_limit(manifest.tokenizer, name))
            target.publish(staged, relative)
        notify(relative)


def _read_text(store: CacheStore, relative: str, limit: int) -> str:
    """A small text file of the source (its manifest, its card), at most `limit` bytes of UTF-8."""
    text = store.read_text(relative, limit)
    if text is None:
        raise KDCacheError(f"{relative} is missing from cache {store}")
    return text


def _subset_manifest(manifest: Manifest, shards: list[ShardInfo], target: Destination, store: CacheStore,
                     identity: dict) -> Manifest:
    """The manifest of a subset: its own totals, statistics, content hash and fingerprint, and where it came from.

    Whole shards keep their dump accumulators; the shards keep the source's fingerprint in their
    metadata, which `sources[0].shard_fingerprints` vouches for.
    """
    whole = {shard.file for shard in shards if shard in manifest.shards}
    source_stats = manifest.stats.get("shard_stats", {})
    stats = derived_stats(str(target), manifest, shards,
                          {file: entry for file, entry in source_stats.items() if file in whole}, [])
    origin = identity | {"location": str(store), "rows": sum(shard.rows for shard in shards),
                         "shard_fingerprints": sorted(manifest.shard_fingerprints), "sources": manifest.sources}
    return dataclasses.replace(
        manifest, shards=shards, stats=stats, sources=[origin],
        dataset={**manifest.dataset, "rows_dumped": origin["rows"]},
        dump_fingerprint=sha256_json({"subset_of": manifest.dump_fingerprint, "selection": identity["selection"]}),
        kdcache_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
