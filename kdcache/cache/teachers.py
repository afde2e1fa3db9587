"""Several teachers, one cache: `kdcache merge --teachers` joins caches of the same rows dumped by different teachers.

Why joining dumps (and not `dump-teacher --append-to`): each teacher is dumped as it is today — on its own
machine, in parallel with the others, resumable, verified, usable alone — and the join only checks and links
files. A teacher appended later is one more dump and one more join, never a rewrite of the cache.

Layout (docs/format.md, "Several teachers"): the joined cache *is* the first teacher's cache (its shards
hard-linked, its manifest with a new dump fingerprint and a `teachers` list), and every other teacher is a
complete cache of its own under `teachers/<name>/`, its manifest's sha256 recorded in `teachers`. So nothing
about a cache of one teacher changes, no format version changes (a reader that does not know `teachers` reads
the first teacher's cache, which is exactly what the files are), and `verify`, `copy`, `recode` apply to each
teacher's cache as they are.

The teachers must hold the same rows: the same sample ids and tokens in the same order (equal
`content_sha256`), hence the same tokenizer, in shards of the same row counts, so one seeded stream order
reads every teacher's row i together (`read_along`). Teachers with different tokenizers are refused: their
rows are different tokens; a student learns from each cache across tokenizers (`student_tokenizer`).
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import KDCacheError
from .card import CARD_NAME, render_card
from .format import DATA_DIR, MANIFEST_NAME, TEACHERS_DIR, Manifest, sha256_file, sha256_json
from .safety import TEACHER_NAME, check_relative
from .store import CacheStore
from .transfer import Destination, copy_cache, copy_tokenizer
from .writer import CachedSequence


def check_same_rows(first: Manifest, other: Manifest, what: str) -> None:
    """Refuse a teacher's cache that does not hold `first`'s rows in `first`'s shard layout, naming why."""
    if other.tokenizer.get("hash") != first.tokenizer.get("hash"):
        raise KDCacheError(f"{what} has another tokenizer: teachers with different tokenizers cannot share a cache "
                           f"(train from each cache with `student_tokenizer` instead)")
    if other.stats.get("content_sha256") != first.stats.get("content_sha256"):
        raise KDCacheError(f"{what} holds other rows (content_sha256 differs): dump every teacher with the same "
                           f"data, `limit` and `max_length`")
    if [shard.rows for shard in other.shards] != [shard.rows for shard in first.shards]:
        raise KDCacheError(f"{what} splits the rows into other shards: dump every teacher with the same "
                           f"`shard_rows` and number of processes")
    if other.teachers:
        raise KDCacheError(f"{what} is itself a multi-teacher cache: join single-teacher caches")


def teacher_entry(name: str, path: str, manifest: Manifest, location: str) -> dict:
    """What the joined manifest says of one teacher: who (fingerprints), from where, how faithful, how big."""
    return {"name": name, "path": path, "teacher": manifest.teacher, "dump_fingerprint": manifest.dump_fingerprint,
            "location": location, "targets": list(manifest.target_types), "top_k": manifest.top_k,
            "draws": manifest.draws, "fidelity": manifest.stats.get("fidelity"),
            "teacher_nll": manifest.stats.get("teacher_nll"), "bytes": manifest.total_bytes}


def joined_manifest(first: Manifest, entries: list[dict], location: str) -> Manifest:
    """The first teacher's manifest as the joined cache's: the teachers listed, a fingerprint of them all, and
    the first teacher's dump fingerprint vouching for its shards (`sources`)."""
    return Manifest(**{**first.__dict__, "teachers": entries,
                       "dump_fingerprint": sha256_json({"teachers": [[entry["name"], entry["dump_fingerprint"]]
                                                                     for entry in entries]}),
                       "sources": [{"location": location, "dump_fingerprint": first.dump_fingerprint,
                                    "content_sha256": first.stats.get("content_sha256"),
                                    "rows": first.total_rows, "shard_fingerprints": sorted(first.shard_fingerprints),
                                    "sources": first.sources}],
                       "kdcache_version": __version__,
                       "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def join_teachers(locations: list[str | Path], names: list[str], out: Path | str, *, progress: bool = True) -> Manifest:
    """Join the single-teacher caches at `locations` (the same rows, dumped by different teachers), named `names`,
    into the new local cache `out`; the first is the cache's own teacher (the one a plain reader sees)."""
    locations = [str(location).rstrip("/") for location in locations]
    if len(locations) < 2 or len(names) != len(locations):
        raise KDCacheError(f"`teachers`: name each of the {len(locations)} caches (at least two), got {len(names)} names")
    for name in names:
        if not TEACHER_NAME.fullmatch(name):
            raise KDCacheError(f"`teachers`: {name!r} is not a teacher name (letters, digits, `_`, `-`)")
    if len(set(names)) != len(names):
        raise KDCacheError("`teachers`: the names must be distinct")
    manifests = [CacheStore(location).load_manifest() for location in locations]
    for location, manifest in zip(locations[1:], manifests[1:]):
        check_same_rows(manifests[0], manifest, f"cache {location}")
    if manifests[0].teachers:
        raise KDCacheError(f"cache {locations[0]} is itself a multi-teacher cache: join single-teacher caches")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KDCacheError(f"`out` {out} exists and is not empty")
    try:
        return _join(locations, names, manifests, out, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # `out` was empty or absent: leave nothing half-written
        raise


def _join(locations: list[str], names: list[str], manifests: list[Manifest], out: Path, progress: bool) -> Manifest:
    teachers = [{"name": name, "path": f"{TEACHERS_DIR}/{name}" if index else "", "location": location}
                for index, (name, location) in enumerate(zip(names, locations))]
    for teacher in teachers[1:]:
        copy_cache(teacher["location"], out / teacher["path"], progress=progress)  # every shard checked on arrival
    _link_or_copy(CacheStore(locations[0]), manifests[0], out, progress)
    joined = joined_manifest(manifests[0], describe_teachers(out, manifests[0], teachers), locations[0])
    (out / CARD_NAME).write_text(render_card(joined, str(out)))
    joined.save(out)
    return joined


def describe_teachers(out: Path, own: Manifest, teachers: list[dict]) -> list[dict]:
    """The `teachers` entries of the multi-teacher cache being written at `out`, whose own teacher's manifest is
    `own`: `teachers` gives each one's name, path and provenance (`location`), the caches under `out` the rest."""
    entries = []
    for teacher in teachers:
        if not teacher["path"]:
            entries.append(teacher_entry(teacher["name"], "", own, teacher.get("location")))
            continue
        directory = out / check_relative(teacher["path"])
        entries.append(teacher_entry(teacher["name"], teacher["path"], Manifest.load(directory),
                                     teacher.get("location"))
                       | {"manifest_sha256": sha256_file(directory / MANIFEST_NAME)})
    return entries


def _link_or_copy(store: CacheStore, manifest: Manifest, out: Path, progress: bool) -> None:
    """The first teacher's shards and tokenizer into `out`: hard links to a verified local cache, else a copy
    (whose manifest, written last by the copy, is then replaced by the joined one)."""
    if store.remote:
        copy_cache(store.location, out, progress=progress)
        return
    source = Path(store.location)
    for shard in manifest.shards:
        path = source / check_relative(shard.file, "shard", under=DATA_DIR)
        if sha256_file(path) != shard.sha256:
            raise KDCacheError(f"shard {shard.file} of cache {store} fails its sha256 check")
        (out / shard.file).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, out / shard.file)
        except OSError:
            shutil.copyfile(path, out / shard.file)
    copy_tokenizer(store, manifest, Destination(out))  # checked against the manifest's sha256 of each


def read_along(rows: Iterator[CachedSequence], others: dict[str, Iterator[CachedSequence]]) -> Iterator[CachedSequence]:
    """Each row of the first teacher with the other teachers' row attached (`CachedSequence.teachers`); the
    streams follow one order (same shard layout, same seed), and every row is checked to be the same row."""
    for row in rows:
        row.teachers = {name: next(stream) for name, stream in others.items()}
        for name, other in row.teachers.items():
            if other.sample_id != row.sample_id or not np.array_equal(other.input_ids, row.input_ids):
                raise KDCacheError(f"teacher {name}'s row {other.sample_id} is not the cache's row {row.sample_id}: "
                                   f"the teachers' caches hold other rows")
        yield row

