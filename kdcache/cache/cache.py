"""`Cache`: one object for a cache, local or remote — its manifest, its integrity, its rows.

Everything that reads a cache takes a `Cache`: the store (where the bytes are) and the manifest
(what they mean) travel together, so no caller can pair a store with another cache's manifest.
A `Cache` may be a *subset* (`subset`, `split`): the same files, restricted to some sample ids,
which is how a train/validation split is read without copying anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import KDCacheError
from .format import Manifest, ShardInfo
from .reader import content_sha256, shard_sample_ids, stream_sequences, verify_shard
from .safety import check_tokenizer_files
from .split import CacheSplit, split_sample_ids
from .store import TRANSFER_TIMEOUT, CacheStore
from .validate import CheckedShard, check_unique_sample_ids, open_checked
from .writer import CachedSequence


def open_cache(path_or_url: str | Path, read_through: str | Path | None = None, *,
               transfer_timeout: float = TRANSFER_TIMEOUT) -> Cache:
    """Open the cache at a directory or an fsspec URL (`s3://`, `gs://`, `hf://`, `http(s)://`, ...).

    Reads only the manifest (every field checked: a received cache is untrusted input); shards are
    opened as they are read, each record batch checked (kdcache/cache/validate.py). For a remote cache,
    `read_through` names a local directory where each shard is downloaded once, checked and
    memory-mapped, and `transfer_timeout` bounds each transfer in seconds.
    """
    store = CacheStore(path_or_url, read_through, transfer_timeout)
    return Cache(store, store.load_manifest())


def as_cache(cache: Cache | str | Path) -> Cache:
    """`cache` itself, or the cache opened at that path or URL: the public functions accept either."""
    return cache if isinstance(cache, Cache) else open_cache(cache)


class Cache:
    """A cache's manifest and files; cheap to pickle into loader workers.

    `kept_rows` (ascending row numbers per shard) makes a subset; None is every row. Build subsets
    with `subset` or `split` rather than by hand.
    """

    def __init__(self, store: CacheStore, manifest: Manifest, kept_rows: list[np.ndarray] | None = None):
        self.store = store
        self.manifest = manifest
        self.kept_rows = kept_rows if kept_rows is not None else [np.arange(shard.rows) for shard in manifest.shards]

    @property
    def location(self) -> str:
        """The directory or URL the cache was opened from."""
        return self.store.location

    def __str__(self) -> str:
        """The location, any credential in it redacted (`safety.redact_url`): what records and messages show."""
        return str(self.store)

    def __repr__(self) -> str:
        return f"Cache({str(self)!r}, task={self.manifest.task!r}, rows={len(self)})"

    def __len__(self) -> int:
        """Sequences in this cache (or subset)."""
        return sum(len(rows) for rows in self.kept_rows)

    def check_files(self) -> None:
        """The cheap check: every shard the manifest lists exists with the recorded size."""
        if not self.manifest.shards:
            raise KDCacheError(f"cache {self} has no shards")
        for shard in self.manifest.shards:
            size = self.store.size(shard.file)
            if size is None:
                raise KDCacheError(f"shard {shard.file} is missing from cache {self}")
            if size != shard.bytes:
                raise KDCacheError(f"shard {shard.file} has {size} bytes, "
                                   f"the manifest says {shard.bytes}: the shard was modified or truncated")

    def verify(self, *, progress: bool = True) -> None:
        """Check the tokenizer files against their sha256, re-hash every shard, check its schema, counts,
        batch hashes and every value (kdcache/cache/validate.py), and that sample ids are unique; raise
        naming the first bad file.

        Integrity belongs to the files, so a subset verifies the whole cache.
        """
        self.tokenizer_dir()
        self.check_files()
        ids = []
        for shard in tqdm(self.manifest.shards, desc="verify", unit="shard", disable=not progress):
            ids.append(verify_shard(self.store, self.manifest, shard))
        check_unique_sample_ids(ids, self.manifest)
        if self.manifest.teachers:
            rows = content_sha256(self.store, self.manifest, self.manifest.shards)
            for name, teacher in self.teacher_caches().items():
                try:
                    teacher.verify(progress=progress)
                except KDCacheError as error:  # its shards are named as in any cache: say which teacher's
                    raise KDCacheError(f"teacher {name} of cache {self} ({teacher}): {error}") from None
                if content_sha256(teacher.store, teacher.manifest, teacher.manifest.shards) != rows:
                    raise KDCacheError(f"teacher {name} of cache {self} holds other rows or tokens than the cache")

    def teacher_caches(self) -> dict[str, Cache]:
        """The other teachers of a multi-teacher cache by name (kdcache/cache/teachers.py), each a Cache over the
        same rows as this one (a subset keeps the same rows of each); empty for a cache of one teacher."""
        from .teachers import check_same_rows
        caches = {}
        for entry in self.manifest.teachers[1:]:
            store, manifest = self.store.teacher(entry["path"], entry["manifest_sha256"])
            check_same_rows(self.manifest, manifest, f"teacher {entry['name']} of cache {self}")
            caches[entry["name"]] = Cache(store, manifest, self.kept_rows)
        return caches

    def open_shard(self, shard: ShardInfo, *, full: bool = False, hidden_layers: list[int] | None = None,
                   fields: list[int] | None = None) -> CheckedShard:
        """One shard of this cache for reading, each record batch checked as it is decoded (`validate.open_checked`)."""
        return open_checked(self.store, self.manifest, shard, full=full, hidden_layers=hidden_layers, fields=fields)

    def _shard_ids(self) -> list[np.ndarray]:
        """Each shard's sample ids in row order, refused if any id appears twice or a shard holds another
        number of rows than the manifest says (row numbers index them)."""
        ids = shard_sample_ids(self.store, self.manifest)
        for shard, shard_ids in zip(self.manifest.shards, ids):
            if len(shard_ids) != shard.rows:
                raise KDCacheError(f"shard {shard.file} holds {len(shard_ids)} rows, the manifest says {shard.rows}")
        check_unique_sample_ids(ids, self.manifest)
        return ids

    def sample_ids(self) -> np.ndarray:
        """Every sample id of this cache (or subset), in shard order."""
        ids = [shard_ids[rows] for shard_ids, rows in zip(self._shard_ids(), self.kept_rows)]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def subset(self, sample_ids: Iterable[int]) -> Cache:
        """The rows whose sample id is in `sample_ids`, as a Cache over the same files.

        The row numbers are looked up once (one column of every shard), so a subset read every
        epoch costs nothing more than the whole cache.
        """
        wanted = np.fromiter(sample_ids, dtype=np.int64)
        kept = [rows[np.isin(ids[rows], wanted)]
                for ids, rows in zip(self._shard_ids(), self.kept_rows)]
        return Cache(self.store, self.manifest, kept)

    def split(self, fraction: float, *, setting: str = "val_fraction") -> CacheSplit:
        """Hold out `fraction` of the sequences by a hash of their sample id (see split.py): the same
        rows on any machine and any shard layout; `subset(split.train)` and `subset(split.heldout)` read them."""
        return split_sample_ids(self.sample_ids(), fraction, setting=setting)

    def sequences(self, *, hidden_layers: list[int] | None = None, shuffle: bool = False, seed: int = 0,
                  epoch: int = 0, shuffle_buffer: int = 1024, process_index: int = 0, num_processes: int = 1,
                  start: int = 0, sample_ids: Iterable[int] | None = None,
                  teachers: Sequence[str] = ()) -> Iterator[CachedSequence]:
        """Stream this process's sequences of one epoch, optionally shuffled, from the `start`-th on.

        The order depends only on `seed`, `epoch` and `num_processes`; every process gets an equal,
        disjoint share, and `start` resumes a stream exactly (see `reader.stream_sequences`).
        `hidden_layers` selects which cached hidden states are decoded (default none);
        `sample_ids` reads only those rows (a one-off `subset`). `teachers` (other teachers of a multi-teacher
        cache) attaches each one's targets for the row to `CachedSequence.teachers`.
        """
        cache = self if sample_ids is None else self.subset(sample_ids)
        options = dict(hidden_layers=hidden_layers or [], shuffle=shuffle, seed=seed, epoch=epoch,
                       shuffle_buffer=shuffle_buffer, process_index=process_index, num_processes=num_processes,
                       start=start)
        rows = stream_sequences(self.store, self.manifest, cache.kept_rows, **options)
        if not teachers:
            return rows
        from .teachers import read_along
        others = self.teacher_caches()
        unknown = [name for name in teachers if name not in others]
        if unknown:
            raise KDCacheError(f"cache {self} has no other teacher named {', '.join(unknown)} (it has "
                               f"{', '.join(self.manifest.teacher_names) or 'one teacher'})")
        options["hidden_layers"] = []  # hidden states are this cache's teacher's only
        return read_along(rows, {name: stream_sequences(others[name].store, others[name].manifest, cache.kept_rows,
                                                        **options) for name in teachers})

    def tokenizer_dir(self) -> Path:
        """A local directory holding the teacher's tokenizer (downloaded once when the cache is remote), once
        its files match the manifest's sha256 of each (`safety.check_tokenizer_files`): a student is built
        with and ships these files."""
        directory = self.store.tokenizer_dir(self.manifest.tokenizer)
        check_tokenizer_files(directory, self.manifest.tokenizer.get("files", {}), self.manifest.vocab_size)
        return directory

    def to_dataset(self, **load_dataset_options):
        """The shards as a Hugging Face `datasets.Dataset`, one row per sequence, every column as stored.

        Goes through `datasets.load_dataset("arrow", ...)`, the path the format promises to support,
        so options such as `streaming=True` or `cache_dir=` apply. A subset keeps its rows only.
        """
        import datasets

        files = [self.store._url(shard.file) for shard in self.manifest.shards]
        dataset = datasets.load_dataset("arrow", data_files=files, split="train", **load_dataset_options)
        if len(self) == self.manifest.total_rows:
            return dataset
        if isinstance(dataset, datasets.IterableDataset):
            wanted = set(self.sample_ids().tolist())
            return dataset.filter(lambda row: row["sample_id"] in wanted)
        starts = np.cumsum([0] + [shard.rows for shard in self.manifest.shards[:-1]])
        return dataset.select(np.concatenate([start + rows for start, rows in zip(starts, self.kept_rows)]))
