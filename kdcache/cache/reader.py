"""Reading a cache: integrity checks and a lazy, distributed, resumable stream of sequences.

Shards are opened through a `CacheStore` (memory-mapped when local, ranged reads when remote),
one at a time, and only the record batches a process needs are decoded, so the resident memory
does not grow with the cache. Integrity is checked against the manifest
before a cache is trusted: a shared cache may have been copied, truncated or edited.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ..errors import KDCacheError
from .format import Manifest, ShardInfo, shard_schema
from .sharding import BufferedShuffle, RowSpan, process_spans
from .store import CacheStore, as_store
from .writer import CachedSequence, Ragged


def expected_schema(manifest: Manifest) -> pa.Schema:
    settings = manifest.settings
    return shard_schema(top_k=manifest.top_k, vocab_size=manifest.num_classes,
                        logprob_dtype=settings["logprob_dtype"], hidden_sizes=manifest.hidden_sizes,
                        dump_fingerprint=manifest.dump_fingerprint, target_types=manifest.target_types,
                        optional_columns=manifest.optional_columns, pooled_size=manifest.pooled_size)


def check_shard_files(cache: CacheStore | str | Path, manifest: Manifest) -> None:
    """The cheap check: every shard the manifest lists exists with the recorded size."""
    store = as_store(cache)
    if not manifest.shards:
        raise KDCacheError(f"cache {store} has no shards")
    for shard in manifest.shards:
        size = store.size(shard.file)
        if size is None:
            raise KDCacheError(f"shard {shard.file} is missing from cache {store}")
        if size != shard.bytes:
            raise KDCacheError(f"shard {shard.file} has {size} bytes, "
                               f"the manifest says {shard.bytes}: the shard was modified or truncated")


def _verify_shard(store: CacheStore, shard: ShardInfo, schema: pa.Schema) -> None:
    if store.sha256(shard.file) != shard.sha256:
        raise KDCacheError(f"shard {shard.file} fails its sha256 check: the file was modified or corrupted")
    reader = store.open_shard(shard.file)
    if not reader.schema.equals(schema, check_metadata=True):
        raise KDCacheError(f"shard {shard.file} has schema {reader.schema.names} that does not match the manifest")
    rows = tokens = 0
    for index in range(reader.num_record_batches):
        batch = reader.get_batch(index)
        rows += batch.num_rows
        tokens += len(batch.column("input_ids").flatten())
    if (rows, tokens) != (shard.rows, shard.tokens):
        raise KDCacheError(f"shard {shard.file} holds {rows} rows / {tokens} tokens, "
                           f"the manifest says {shard.rows} / {shard.tokens}")


def verify_cache(cache: CacheStore | str | Path, manifest: Manifest, *, progress: bool = True) -> None:
    """Re-hash every shard and check its schema and counts; raise naming the first bad shard."""
    store = as_store(cache)
    check_shard_files(store, manifest)
    schema = expected_schema(manifest)
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        _verify_shard(store, shard, schema)


def content_sha256(cache: CacheStore | str | Path, shards: list[ShardInfo]) -> str:
    """sha256 over every row's sample id (int64) and tokens (int32), in shard order.

    Identifies what text a cache covers independently of the targets, so two caches of the same
    data compare equal whatever teacher, settings or number of processes made them.
    """
    store = as_store(cache)
    digest = hashlib.sha256()
    for shard in shards:
        reader = store.open_shard(shard.file)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            tokens = batch.column("input_ids")
            offsets = tokens.offsets.to_numpy()
            offsets = offsets - offsets[0]
            values = tokens.flatten().to_numpy()
            for row, sample_id in enumerate(batch.column("sample_id").to_numpy()):
                digest.update(np.int64(sample_id).tobytes() + values[offsets[row]:offsets[row + 1]].tobytes())
    return digest.hexdigest()


class _DecodedBatch:
    """One record batch as numpy views of its value buffers; rows are copied out one at a time.

    Copying a row (not viewing it) lets the shard's memory map be released as soon as the reader
    moves on, so resident memory is bounded by the shuffle buffer, not by the cache. Target
    columns the cache does not hold (see `Manifest.target_types`) stay None in the rows.
    Each column keeps its own row offsets: token columns (input_ids, token_type_ids, hidden_*)
    have one entry per token, target columns one per target position, which is every token
    except for classification caches, and `pooled` one per row.
    """

    COLUMNS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "token_type_ids",
               "target_positions", "labels", "pooled", "position_ids")
    RAGGED_COLUMNS = ("sampled_ids", "sampled_counts")

    def __init__(self, batch: pa.RecordBatch, hidden_layers: list[int]):
        names = set(batch.schema.names)
        self.columns = {name: self._per_row(batch, name) for name in self.COLUMNS if name in names}
        self.ragged = {name: self._per_position(batch, name) for name in self.RAGGED_COLUMNS if name in names}
        self.hidden = {layer: self._per_row(batch, f"hidden_{layer}") for layer in hidden_layers}
        self.sample_ids = batch.column("sample_id").to_numpy()

    @staticmethod
    def _per_position(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, Ragged]:
        """A list<list<...>> column: row offsets, and one Ragged over every position of the batch."""
        column = batch.column(name)
        row_offsets = column.offsets.to_numpy()
        positions = column.flatten()
        offsets = positions.offsets.to_numpy()
        return row_offsets - row_offsets[0], Ragged(values=positions.flatten().to_numpy(zero_copy_only=False),
                                                    offsets=offsets - offsets[0])

    @staticmethod
    def _per_row(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
        column = batch.column(name)
        offsets = column.offsets.to_numpy()
        values = column.flatten()
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
            values = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            values = values.to_numpy(zero_copy_only=False)
        return offsets - offsets[0], values

    def row(self, index: int) -> CachedSequence:
        def cut(column: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            offsets, values = column
            return values[offsets[index]:offsets[index + 1]].copy()

        def cut_ragged(column: tuple[np.ndarray, Ragged]) -> Ragged:
            offsets, values = column
            lists = values.positions(slice(offsets[index], offsets[index + 1]))
            return Ragged(values=lists.values.copy(), offsets=lists.offsets)

        return CachedSequence(sample_id=int(self.sample_ids[index]),
                              **{name: cut(column) for name, column in self.columns.items()},
                              **{name: cut_ragged(column) for name, column in self.ragged.items()},
                              hidden={layer: cut(column) for layer, column in self.hidden.items()})


def shard_sample_ids(cache: CacheStore | str | Path, manifest: Manifest) -> list[np.ndarray]:
    """Each shard's sample ids in row order; loads only the `sample_id` column (schema field 0)."""
    store = as_store(cache)
    ids = []
    for shard in manifest.shards:
        reader = store.open_shard(shard.file, fields=[0])
        batches = [reader.get_batch(index).column("sample_id").to_numpy() for index in range(reader.num_record_batches)]
        ids.append(np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64))
    return ids


def read_sample_ids(cache: CacheStore | str | Path, manifest: Manifest) -> np.ndarray:
    """Every sample id in the cache, in shard order."""
    ids = shard_sample_ids(cache, manifest)
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def select_rows(cache: CacheStore | str | Path, manifest: Manifest, sample_ids: frozenset[int]) -> list[np.ndarray]:
    """Per shard, the ascending row numbers whose sample id is in `sample_ids` (a train/validation
    split): the `kept_rows` of `iter_sequences`. Computed once per run, not once per epoch."""
    wanted = np.fromiter(sample_ids, dtype=np.int64, count=len(sample_ids))
    return [np.flatnonzero(np.isin(ids, wanted)) for ids in shard_sample_ids(cache, manifest)]


def _read_spans(store: CacheStore, manifest: Manifest, spans: list[RowSpan], kept_rows: list[np.ndarray],
                hidden_layers: list[int], wanted) -> Iterator[tuple[int, CachedSequence | None]]:
    """Yield (position, row) along the spans; rows `wanted(position)` rejects are not decoded (None).

    A span counts kept rows: span `start:stop` of shard s is rows `kept_rows[s][start:stop]`.
    Record batches holding none of those rows are never decoded; a shard is opened only while it is read.
    """
    position = 0
    for span in spans:
        rows = kept_rows[span.shard][span.start:span.stop]  # ascending, never empty
        reader = store.open_shard(manifest.shards[span.shard].file)
        first_row = 0
        for batch_index in range(reader.num_record_batches):
            if first_row > rows[-1]:
                break
            batch = reader.get_batch(batch_index)
            end_row = first_row + batch.num_rows
            inside = rows[np.searchsorted(rows, first_row):np.searchsorted(rows, end_row)]
            needed = [wanted(position + offset) for offset in range(len(inside))]
            decoded = _DecodedBatch(batch, hidden_layers) if any(needed) else None
            for row, need in zip(inside.tolist(), needed):
                yield position, decoded.row(row - first_row) if need else None
                position += 1
            first_row = end_row
        del reader


def iter_sequences(cache: CacheStore | str | Path, manifest: Manifest, *, hidden_layers: list[int] | None = None,
                   shuffle: bool = False, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1024,
                   process_index: int = 0, num_processes: int = 1, start: int = 0,
                   kept_rows: list[np.ndarray] | None = None) -> Iterator[CachedSequence]:
    """Stream this process's sequences of one epoch, optionally shuffled, from the `start`-th on.

    The process's share is `process_spans` (disjoint, equal-sized shares); the order is the seeded
    shard order then a bounded shuffle buffer, so it depends only on the seed, the epoch and the
    number of processes. Resuming at `start` replays the shuffle on positions and decodes only the
    rows still to come. `hidden_layers` limits which hidden columns are decoded (default: none).

    `kept_rows` (from `select_rows`; default: every row) restricts the stream to a subset of
    each shard, e.g. the training side of a train/validation split. Sharding and shuffling work on
    kept rows only: each shard counts as `len(kept_rows[s])` rows, so `process_spans` deals out
    kept rows (equal shares, hence equal step counts) and positions, and so resume offsets, count
    kept rows; the span is mapped back to shard row numbers only when reading. Without a subset
    `kept_rows` is every row, so there is one code path.
    """
    store = as_store(cache)
    if kept_rows is None:
        kept_rows = [np.arange(shard.rows) for shard in manifest.shards]
    spans = process_spans([len(rows) for rows in kept_rows], process_index=process_index,
                          num_processes=num_processes, shuffle=shuffle, seed=seed, epoch=epoch)
    count = sum(span.stop - span.start for span in spans)
    order = BufferedShuffle(count, shuffle_buffer if shuffle else 1,
                            random.Random(f"{seed}-{epoch}-{process_index}-{num_processes}"))
    positions = iter(order)
    for _ in zip(range(start), positions):
        pass
    still_buffered, first_unread = set(order.buffer), order.next_input
    rows = _read_spans(store, manifest, spans, kept_rows, hidden_layers or [],
                       lambda position: position >= first_unread or position in still_buffered)
    pending: dict[int, CachedSequence] = {}
    for position in positions:
        while position not in pending:
            read_position, sequence = next(rows)
            if sequence is not None:
                pending[read_position] = sequence
        yield pending.pop(position)
