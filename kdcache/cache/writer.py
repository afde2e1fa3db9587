"""Writing shards: rows in, complete Arrow IPC files out, never a half-written file in sight.

A shard is written under `<name>.arrow.partial`, flushed to disk, then renamed; only then is it
hashed and reported, so a crash leaves at most a `.partial` file that no reader treats as data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from ..errors import KDCacheError
from .codecs import Codec, Ragged, encode_row
from .format import DATA_DIR, HIDDEN_PREFIX, PARTIAL_SUFFIX, SHARD_SUFFIX, ShardInfo, sha256_file
from .validate import batch_digests

__all__ = ["CachedSequence", "Ragged", "ShardWriter", "to_record_batch"]


@dataclasses.dataclass
class CachedSequence:
    """The teacher's targets for one tokenized sequence of length L (one shard row).

    Target arrays have one entry per target position: L of them for a causal LM, fewer for
    classification tasks, which say where they are in `target_positions` (kdcache/tasks.py).
    Target columns the cache does not hold (see `Manifest.target_types`) are None. This is the
    decoded view whatever the codec (kdcache/cache/codecs.py): top-k rows may end in empty slots
    (log-prob -inf) when positions list different numbers of ids.
    """

    sample_id: int
    input_ids: np.ndarray                  # int32 [L]
    topk_ids: np.ndarray | None = None     # integer [L, k]
    topk_logprobs: np.ndarray | None = None  # float16/float32 [L, k], -inf in empty slots
    tail_logprob: np.ndarray | None = None   # float32 [L]
    hidden: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # layer -> float16 [L, d]
    sampled_ids: Ragged | None = None      # uint16/uint32, distinct drawn ids per position, ascending
    sampled_counts: Ragged | None = None   # uint16, how often each was drawn (same offsets)
    token_type_ids: np.ndarray | None = None     # int8 [L], text pairs only
    target_positions: np.ndarray | None = None   # int32 [T], ascending; None = every position
    labels: np.ndarray | None = None             # int32 [T], gold class per target
    token_offsets: np.ndarray | None = None      # int32 [L, 2], each token's [start, end) in `text`
    text: str | None = None                      # the text the tokens cover (see tasks/spans.py)
    position_ids: np.ndarray | None = None       # int32 [L], packed documents only
    pooled: np.ndarray | None = None             # float16 [1, d], an encoder's pooled output
    # a multi-teacher cache read with `teachers` (Cache.sequences): the other teachers' targets for this row
    teachers: dict[str, CachedSequence] = dataclasses.field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        if name.startswith(HIDDEN_PREFIX):
            return self.hidden[int(name.removeprefix(HIDDEN_PREFIX))]
        return getattr(self, name)


def _ragged(values: list[np.ndarray | Ragged], list_type: pa.ListType) -> pa.Array:
    """A list<...> column from per-row arrays (row i's list is `values[i]`, along its first dimension)."""
    lengths = np.array([len(value) for value in values], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    item_type = list_type.value_type
    if isinstance(values[0], Ragged):
        lengths = np.concatenate([row.lengths() for row in values])
        inner_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        inner = pa.array(np.concatenate([row.values for row in values]), type=item_type.value_type)
        return pa.ListArray.from_arrays(offsets, pa.ListArray.from_arrays(inner_offsets, inner))
    flat = np.concatenate(values)
    if flat.ndim == 1:
        return pa.ListArray.from_arrays(offsets, pa.array(flat, type=item_type))
    inner = pa.array(flat.reshape(-1), type=item_type.value_type)
    return pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(inner, flat.shape[1]))


def to_record_batch(rows: list[CachedSequence], schema: pa.Schema, codec: Codec = Codec()) -> pa.RecordBatch:
    """Pack rows into one record batch of `schema`, targets encoded by `codec`, without per-value Python work."""
    encoded = [encode_row(row, codec) if codec.layout == "compact" else {} for row in rows]
    columns = [pa.array([row.sample_id for row in rows], type=schema.field("sample_id").type)]
    columns += [_ragged([stored[field.name] if field.name in stored else row.column(field.name)
                         for row, stored in zip(rows, encoded)], field.type) if pa.types.is_list(field.type)
                else pa.array([row.column(field.name) for row in rows], type=field.type)  # one value per row: text
                for field in list(schema)[1:]]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")


class ShardWriter:
    """Appends record batches to `data/<prefix>-NNNNN.arrow`, starting a new shard every `shard_rows`.

    NNNNN counts from `start_index`, so a dump that plans its shards up front can name each one.

    Lifecycle: `write()` any number of times, then `close()` (returns every finished shard) or
    `abort()` (removes the shard in progress). Usable as a context manager that aborts on error.
    `open_file` opens each shard file for writing (a seam: e.g. a test's full disk).
    """

    def __init__(self, cache_dir: Path, schema: pa.Schema, *, shard_rows: int, prefix: str = "shard-00000",
                 start_index: int = 0, codec: Codec = Codec(),
                 open_file: Callable[[Path], BinaryIO] = open_for_writing):
        self.cache_dir = Path(cache_dir)
        self.open_file = open_file
        self.schema = schema
        self.codec = codec
        self.shard_rows = shard_rows
        self.prefix = prefix
        self.start_index = start_index
        self.finished: list[ShardInfo] = []
        self._sink = None
        self._writer = None
        self._rows = 0
        self._tokens = 0
        (self.cache_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)

    def _relative_name(self) -> str:
        return f"{DATA_DIR}/{self.prefix}-{self.start_index + len(self.finished):05d}{SHARD_SUFFIX}"

    def _partial_path(self) -> Path:
        return self.cache_dir / (self._relative_name() + PARTIAL_SUFFIX)

    def write(self, rows: list[CachedSequence]) -> None:
        if not rows:
            return
        batch = to_record_batch(rows, self.schema, self.codec)
        try:
            if self._writer is None:
                self._sink = self.open_file(self._partial_path())
                self._writer = pa.ipc.new_file(self._sink, self.schema, options=self.codec.write_options())
            self._writer.write_batch(batch)
        except OSError as error:
            self.abort()
            raise KDCacheError(f"cannot write shard {self._partial_path()}: {error.strerror or error}") from None
        self._rows += len(rows)
        self._tokens += sum(len(row.input_ids) for row in rows)
        if self._rows >= self.shard_rows:
            self._finish_shard()

    def _finish_shard(self) -> None:
        partial = self._partial_path()
        final = self.cache_dir / self._relative_name()
        try:
            self._writer.close()
            self._sink.flush()
            os.fsync(self._sink.fileno())
            self._sink.close()
            os.replace(partial, final)
        except OSError as error:
            self.abort()
            raise KDCacheError(f"cannot finish shard {final}: {error.strerror or error}") from None
        self.finished.append(ShardInfo(file=self._relative_name(), rows=self._rows, tokens=self._tokens,
                                       bytes=final.stat().st_size, sha256=sha256_file(final),
                                       batch_sha256=batch_digests(final)))
        self._writer = self._sink = None
        self._rows = self._tokens = 0

    def close(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._finish_shard()
        return self.finished

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay (they are complete and hashed)."""
        partial = self._partial_path()
        for closable in (self._writer, self._sink):
            try:
                if closable is not None:
                    closable.close()
            except (OSError, pa.ArrowException):
                pass
        self._writer = self._sink = None
        partial.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
