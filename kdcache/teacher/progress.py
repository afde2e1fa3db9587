"""The on-disk state of an unfinished dump: a lock, the settings it runs with, one record per shard.

A dump plans its shards up front (shard i always holds the same range of sample ids) so that it can
be killed at any moment and rerun. A shard counts as done only when its file has been renamed into
place *and* its record (file, rows, tokens, bytes, sha256, statistics) has been written atomically
after it. On resume every record is checked against its file (size and sha256); everything else —
`.partial` files, shard files without a record, records whose file is missing or differs — is
removed and that shard is computed again. So every sample id ends up in the cache exactly once.

Layout, inside the cache directory until the manifest is committed:

    kdcache.dump/settings.json      what the dump computes (fingerprint, settings): a rerun must match
    kdcache.dump/lock               flock'ed by the running dump's main process
    kdcache.dump/shards/NNNNN.json  record of finished planned shard NNNNN
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
from pathlib import Path
from typing import Any

from ..cache.format import (
    DATA_DIR,
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    ShardInfo,
    sha256_file,
    write_json_atomic,
)
from ..errors import KDCacheError

PROGRESS_DIR = "kdcache.dump"
SETTINGS_NAME = "settings.json"
LOCK_NAME = "lock"
RECORDS_DIR = "shards"


@dataclasses.dataclass
class ShardRecord:
    """What a finished planned shard contributes to the manifest.

    `shard` is None when no row of its range was written (all empty, or all skipped as non-finite).
    """

    index: int
    shard: ShardInfo | None
    captured: dict[str, Any]          # StreamingSummary.state() of the written positions
    fidelity: dict[str, Any]          # FidelityCard.state() of the written positions
    nll_sum: float
    nll_count: int
    nonfinite_positions: int = 0
    nonfinite_sample_ids: list[int] = dataclasses.field(default_factory=list)
    dropped: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # reason -> sample ids with nothing to target

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        shard = data.get("shard")
        return cls(**{**data, "shard": ShardInfo(**shard) if shard else None})


class DumpLock:
    """An exclusive `flock` on `kdcache.dump/lock`; the kernel drops it when the process dies."""

    def __init__(self, out: Path):
        path = out / PROGRESS_DIR / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise KDCacheError(f"another kdcache dump is writing to {out} (it holds {path}); "
                               f"wait for it to finish or choose another `out`") from None

    def release(self) -> None:
        self._handle.close()


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Name the settings that differ, e.g. 'top_k 8 → 5'; teacher/data changes show as the fingerprint."""
    before = old.get("settings", {})
    changed = [f"{name} {before.get(name)} → {value}" for name, value in new["settings"].items()
               if before.get(name) != value]
    return ", ".join(changed) or "teacher, tokenizer or data"


def claim_output(out: Path, identity: dict[str, Any]) -> DumpLock | None:
    """Lock `out` for this dump and check it may resume there; return the held lock, or None when `out`
    already holds this very cache (a rerun of a finished dump is a no-op, so scripts can be idempotent).

    `identity` holds `dump_fingerprint` and `settings` (everything that decides the bytes written,
    including batch size and shard size: the same rows must be batched the same way for a resumed
    cache to equal an uninterrupted one). A finished cache, a directory holding anything else, or
    an interrupted dump with another identity are refused; only our own state is ever deleted.
    """
    identity = json.loads(json.dumps(identity))  # as it reads back from disk: tuples become lists
    progress = out / PROGRESS_DIR
    if (out / MANIFEST_NAME).exists():
        return _finished_cache(out, identity)
    if out.exists() and any(entry.name != PROGRESS_DIR for entry in out.iterdir()) \
            and not (progress / SETTINGS_NAME).exists():
        raise KDCacheError(f"output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    lock = DumpLock(out)
    try:
        if (out / MANIFEST_NAME).exists():  # another dump finished while we waited for the lock
            lock.release()
            return _finished_cache(out, identity)
        marker = progress / SETTINGS_NAME
        if marker.exists():
            previous = json.loads(marker.read_text())
            if previous != identity:
                raise KDCacheError(f"{out} holds an interrupted dump with different settings "
                                   f"({_describe_difference(previous, identity)}); rerun it with its own "
                                   f"settings, or choose another `out` or delete it")
        else:
            (progress / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
            write_json_atomic(marker, identity)
    except BaseException:
        lock.release()
        raise
    return lock


def _finished_cache(out: Path, identity: dict[str, Any]) -> None:
    """None if `out` holds the cache `identity` describes; refuse a different one."""
    existing = json.loads((out / MANIFEST_NAME).read_text()).get("dump_fingerprint")
    if existing != identity["dump_fingerprint"]:
        raise KDCacheError(f"{out} already holds a different cache; choose another `out` or delete it")


def _record_path(out: Path, index: int) -> Path:
    return out / PROGRESS_DIR / RECORDS_DIR / f"{index:05d}.json"


def write_record(out: Path, record: ShardRecord) -> None:
    """Commit a finished shard: from now on a resumed dump keeps it."""
    write_json_atomic(_record_path(out, record.index), dataclasses.asdict(record))


def load_records(out: Path) -> dict[int, ShardRecord]:
    records = {}
    for path in sorted((out / PROGRESS_DIR / RECORDS_DIR).glob("*.json")):
        record = ShardRecord.from_dict(json.loads(path.read_text()))
        records[record.index] = record
    return records


def _intact(out: Path, shard: ShardInfo | None) -> bool:
    if shard is None:
        return True
    path = out / shard.file
    return path.is_file() and path.stat().st_size == shard.bytes and sha256_file(path) == shard.sha256


def resume_state(out: Path) -> dict[int, ShardRecord]:
    """Keep the shards that were finished and are intact; delete every other trace of earlier runs.

    Must run under the lock and before any process of this run writes a shard.
    """
    records = {}
    for index, record in load_records(out).items():
        if _intact(out, record.shard):
            records[index] = record
        else:
            _record_path(out, index).unlink()
    kept = {record.shard.file for record in records.values() if record.shard is not None}
    for path in (out / DATA_DIR).glob("*"):
        if path.is_file() and f"{DATA_DIR}/{path.name}" not in kept:
            path.unlink()
    for path in (out / PROGRESS_DIR / RECORDS_DIR).glob("*" + PARTIAL_SUFFIX):
        path.unlink()
    return records


def finish(out: Path, lock: DumpLock) -> None:
    """After the manifest is committed: drop the progress state and the lock."""
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    lock.release()

