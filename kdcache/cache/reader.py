"""Reading shards: integrity checks and a lazy, distributed, resumable stream of sequences.

The machinery behind `Cache` (cache.py). Shards are opened through `open_checked` (validate.py) over
a `CacheStore` (memory-mapped when local, ranged reads when remote), one at a time, and only the record
batches a process needs are decoded, so the resident memory does not grow with the cache. Integrity is
checked against the manifest before a cache is trusted, and every batch read is checked again: a shared
cache may have been copied, truncated or edited.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import KDCacheError
from .codecs import Limits, decode_targets, most_probable_first
from .format import COLUMNS as FORMAT_COLUMNS
from .format import HIDDEN_PREFIX, Manifest, ShardInfo, hidden_column
from .sharding import BufferedShuffle, RowSpan, process_spans
from .store import CacheStore, as_store
from .validate import open_checked
from .writer import CachedSequence, Ragged


def verify_shard(store: CacheStore, manifest: Manifest, shard: ShardInfo) -> np.ndarray:
    """Check one shard in full against the manifest's record of it and return its sample ids: its sha256,
    then, through `open_checked(full=True)`, its schema (its dump fingerprint must be one of the manifest's
    `shard_fingerprints`: a merged cache holds shards of several dumps), batch hashes and every value."""
    if store.sha256(shard) != shard.sha256:
        raise KDCacheError(f"shard {shard.file} fails its sha256 check: the file was modified or corrupted")
    reader = open_checked(store, manifest, shard, full=True)
    rows = tokens = 0
    ids = []
    for index in range(reader.num_record_batches):
        batch = reader.get_batch(index)
        rows += batch.num_rows
        tokens += len(batch.column("input_ids").flatten())
        ids.append(batch.column("sample_id").to_numpy())
    if (rows, tokens) != (shard.rows, shard.tokens):
        raise KDCacheError(f"shard {shard.file} holds {rows} rows / {tokens} tokens, "
                           f"the manifest says {shard.rows} / {shard.tokens}")
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def content_sha256(cache: CacheStore | str | Path, manifest: Manifest, shards: list[ShardInfo]) -> str:
    """sha256 over every row's sample id (int64) and tokens (int32), in shard order.

    Identifies what text a cache covers independently of the targets, so two caches of the same
    data compare equal whatever teacher, settings or number of processes made them. The shards (of the
    cache `manifest` describes) are read checked, only their first two columns decoded: a subset's whole
    shards were checked for their sha256 only, and a forged list offset must not reach Arrow's slicing.
    """
    store = as_store(cache)
    digest = hashlib.sha256()
    for shard in shards:
        reader = open_checked(store, manifest, shard, fields=[0, 1])
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            tokens = batch.column("input_ids")
            offsets = tokens.offsets.to_numpy()
            offsets = offsets - offsets[0]
            values = tokens.flatten().to_numpy()
            for row, sample_id in enumerate(batch.column("sample_id").to_numpy()):
                digest.update(np.int64(sample_id).tobytes() + values[offsets[row]:offsets[row + 1]].tobytes())
    return digest.hexdigest()


RAGGED_COLUMNS = ("sampled_ids", "sampled_counts")  # list<list<...>>: a variable count per position
ROW_COLUMNS = ("sample_id", "text")  # one value per row, not a list
# One entry per token, target or row: every other column but the per-row values and the hidden states.
LIST_COLUMNS = tuple(name for name in FORMAT_COLUMNS if name not in (*ROW_COLUMNS, HIDDEN_PREFIX, *RAGGED_COLUMNS))


class _DecodedBatch:
    """One record batch as numpy views of its value buffers; rows are copied out one at a time.

    Copying a row (not viewing it) lets the shard's memory map be released as soon as the reader
    moves on, so resident memory is bounded by the shuffle buffer, not by the cache. Target
    columns the cache does not hold (see `Manifest.target_types`) stay None in the rows.
    Each column keeps its own row offsets: token columns (input_ids, token_type_ids, hidden_*)
    have one entry per token, target columns one per target position, which is every token
    except for classification caches, and `pooled` one per row.
    """

    def __init__(self, batch: pa.RecordBatch, hidden_layers: list[int], manifest: Manifest, file: str):
        codec = manifest.codec
        if codec.layout == "compact":  # the target columns go through the codec, which validates them
            decoded, self.ragged = decode_targets(batch, codec, Limits(manifest.num_classes, manifest.top_k,
                                                                       manifest.draws), file)
            batch = batch.select([name for name in batch.schema.names if name not in decoded
                                  and not name.startswith(("topk_", "sampled_"))])
        else:
            decoded = {}
            self.ragged = {name: self._per_position(batch, name) for name in RAGGED_COLUMNS
                           if name in batch.schema.names}
        names = set(batch.schema.names)
        self.columns = decoded | {name: self._per_row(batch, name) for name in LIST_COLUMNS if name in names}
        if codec.layout == "plain" and "topk_logprobs" in names:  # stored so by every writer; a hostile one may not
            (offsets, ids), (_, logprobs) = self.columns["topk_ids"], self.columns["topk_logprobs"]
            ids, logprobs = most_probable_first(ids, logprobs)
            self.columns |= {"topk_ids": (offsets, ids), "topk_logprobs": (offsets, logprobs)}
        self.hidden = {layer: self._per_row(batch, hidden_column(layer)) for layer in hidden_layers}
        self.sample_ids = batch.column("sample_id").to_numpy()
        self.texts = batch.column("text").to_pylist() if "text" in names else None

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
                              hidden={layer: cut(column) for layer, column in self.hidden.items()},
                              text=None if self.texts is None else self.texts[index])


def shard_sample_ids(store: CacheStore, manifest: Manifest) -> list[np.ndarray]:
    """Each shard's sample ids in row order; loads only the `sample_id` column (schema field 0)."""
    ids = []
    for shard in manifest.shards:
        reader = open_checked(store, manifest, shard, fields=[0])
        batches = [reader.get_batch(index).column("sample_id").to_numpy() for index in range(reader.num_record_batches)]
        ids.append(np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64))
    return ids


def read_spans(store: CacheStore, manifest: Manifest, spans: list[RowSpan], kept_rows: list[np.ndarray],
               hidden_layers: list[int], wanted) -> Iterator[tuple[int, CachedSequence | None]]:
    """Yield (position, row) along the spans; rows `wanted(position)` rejects are not decoded (None).

    A span counts kept rows: span `start:stop` of shard s is rows `kept_rows[s][start:stop]`.
    Record batches holding none of those rows are neither read nor checked nor decoded (their row
    counts come from their headers), and a shard none of whose rows are wanted (a resumed stream's
    past) is never opened; a shard is opened only while it is read.
    """
    position = 0
    for span in spans:
        rows = kept_rows[span.shard][span.start:span.stop]  # ascending, never empty
        if not any(wanted(position + offset) for offset in range(len(rows))):
            yield from ((position + offset, None) for offset in range(len(rows)))
            position += len(rows)
            continue
        reader = open_checked(store, manifest, manifest.shards[span.shard], hidden_layers=hidden_layers)
        first_row = 0
        for batch_index in range(reader.num_record_batches):
            if first_row > rows[-1]:
                break
            end_row = first_row + reader.batch_rows(batch_index)
            inside = rows[np.searchsorted(rows, first_row):np.searchsorted(rows, end_row)]
            needed = [wanted(position + offset) for offset in range(len(inside))]
            decoded = (_DecodedBatch(reader.get_batch(batch_index), hidden_layers, manifest,
                                     manifest.shards[span.shard].file) if any(needed) else None)
            for row, need in zip(inside.tolist(), needed):
                yield position, decoded.row(row - first_row) if need else None
                position += 1
            first_row = end_row
        del reader


def stream_sequences(store: CacheStore, manifest: Manifest, kept_rows: list[np.ndarray], *,
                     hidden_layers: list[int], shuffle: bool, seed: int, epoch: int, shuffle_buffer: int,
                     process_index: int, num_processes: int, start: int) -> Iterator[CachedSequence]:
    """Stream this process's sequences of one epoch, optionally shuffled, from the `start`-th on.

    The process's share is `process_spans` (disjoint, equal-sized shares); the order is the seeded
    shard order then a bounded shuffle buffer, so it depends only on the seed, the epoch and the
    number of processes. Resuming at `start` replays the shuffle on positions and decodes only the
    rows still to come. `hidden_layers` limits which hidden columns are decoded.

    `kept_rows` (ascending row numbers per shard; every row for a whole cache, see `Cache.subset`)
    restricts the stream to a subset of each shard, e.g. the training side of a train/validation
    split. Sharding and shuffling work on kept rows only: each shard counts as `len(kept_rows[s])` rows, so `process_spans` deals out
    kept rows (equal shares, hence equal step counts) and positions, and so resume offsets, count
    kept rows; the span is mapped back to shard row numbers only when reading. Without a subset
    `kept_rows` is every row, so there is one code path.
    """
    spans = process_spans([len(rows) for rows in kept_rows], process_index=process_index,
                          num_processes=num_processes, shuffle=shuffle, seed=seed, epoch=epoch)
    count = sum(span.stop - span.start for span in spans)
    order = BufferedShuffle(count, shuffle_buffer if shuffle else 1,
                            random.Random(f"{seed}-{epoch}-{process_index}-{num_processes}"))
    positions = iter(order)
    for _ in zip(range(start), positions):
        pass
    still_buffered, first_unread = set(order.buffer), order.next_input
    rows = read_spans(store, manifest, spans, kept_rows, hidden_layers,
                      lambda position: position >= first_unread or position in still_buffered)
    pending: dict[int, CachedSequence] = {}
    for position in positions:
        while position not in pending:
            read_position, sequence = next(rows)
            if sequence is not None:
                pending[read_position] = sequence
        yield pending.pop(position)
