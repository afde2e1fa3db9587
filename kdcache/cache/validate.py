"""Checked reading of shards: what trains is what was verified, and every value is in range.

A shard is opened through `open_checked`, whose `get_batch` does, for each record batch:

1. Check the schema against the manifest's (so a value is never read as another type). Before
   anything is decoded, read the batch's IPC message header (a few hundred bytes, parsed
   here from the Arrow flatbuffers: pyarrow exposes no block table) and refuse dictionary batches or
   more rows than the manifest gives the shard. Uncompressed buffers are slices of the file, so
   nothing larger than the file is ever allocated. Compressed buffers (zstd shards, the default
   codec's) each start with their decoded length: their sum must stay within
   `MAX_EXPANSION` times the batch's body, so a 7 KB shard that would decode to 200 MB is refused
   unread while real shards (zstd shrinks kdcache's columns 1.5 to 5 times) pass.
2. Decode it and run Arrow's full structural validation (offsets inside their buffers).
3. When the shard is streamed from a remote store, compare the batch's digest with the one the
   manifest recorded at dump time (`ShardInfo.batch_sha256`): a server that served the real bytes
   to `verify` and other bytes to training is caught. Local files are memory-mapped and checked
   whole by `verify`, so reading them stays zero-copy.
4. Check the values a student would consume (`check_batch`): ids inside the vocabulary, finite
   log-probs ≤ 0, list lengths agreeing with the tokens. `verify` runs it on every column; training
   skips the float checks of hidden columns it does not read.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pyarrow as pa

from ..errors import KDCacheError
from .codecs import Limits, decode_targets
from .format import Manifest, ShardInfo, shard_schema
from .safety import MAX_EXPANSION, printable

LOGPROB_TOLERANCE = 1e-3  # float16 rounding of log-probs just below 0
IGNORE_LABEL = -100  # gold label of positions without one (kdcache/tasks/base.py)
_RECORD_BATCH = 3  # flatbuffers MessageHeader union tag


def expected_schema(manifest: Manifest) -> pa.Schema:
    settings = manifest.settings
    return shard_schema(top_k=manifest.top_k, vocab_size=manifest.num_classes,
                        logprob_dtype=settings["logprob_dtype"], hidden_sizes=manifest.hidden_sizes,
                        dump_fingerprint=manifest.dump_fingerprint, target_types=manifest.target_types,
                        optional_columns=manifest.optional_columns, pooled_size=manifest.pooled_size,
                        codec=manifest.codec, draws=manifest.draws)


def batch_digest(batch: pa.RecordBatch) -> str:
    """sha256 of a record batch's row count and every buffer of every column, in schema order.

    Computed on the decoded buffers (views of the file's body), so the dump (reading its finished
    shard back) and a remote reader (decoding ranged reads) hash exactly the bytes that train.
    """
    digest = hashlib.sha256(struct.pack("<q", batch.num_rows))
    for column in batch.columns:
        for buffer in column.buffers():
            if buffer is None:
                digest.update(b"\xff" * 8)
            else:
                digest.update(struct.pack("<q", buffer.size))
                digest.update(memoryview(buffer))
    return digest.hexdigest()


def batch_digests(path) -> list[str]:
    """The digest of every record batch of a shard file, for its `ShardInfo`."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    return [batch_digest(reader.get_batch(index)) for index in range(reader.num_record_batches)]


class _Table:
    """Just enough of the flatbuffers wire format to read the Arrow IPC footer and message headers."""

    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position
        self.vtable = position - self._unpack("<i", position)
        self.vtable_size = self._unpack("<H", self.vtable)

    def _unpack(self, fmt: str, offset: int):
        if offset < 0:
            raise struct.error("negative offset")
        return struct.unpack_from(fmt, self.data, offset)[0]

    def _field(self, index: int) -> int | None:
        slot = 4 + 2 * index
        offset = self._unpack("<H", self.vtable + slot) if slot < self.vtable_size else 0
        return self.position + offset if offset else None

    def scalar(self, index: int, fmt: str, default=0):
        position = self._field(index)
        return default if position is None else self._unpack(fmt, position)

    def table(self, index: int) -> _Table | None:
        position = self._field(index)
        return None if position is None else _Table(self.data, position + self._unpack("<I", position))

    def structs(self, index: int, fmt: str) -> list[tuple]:
        position = self._field(index)
        if position is None:
            return []
        start = position + self._unpack("<I", position)
        count, size = self._unpack("<I", start), struct.calcsize(fmt)
        if start + 4 + count * size > len(self.data):
            raise struct.error("vector past the end")
        return [struct.unpack_from(fmt, self.data, start + 4 + item * size) for item in range(count)]


def _root(data: bytes) -> _Table:
    return _Table(data, struct.unpack_from("<I", data, 0)[0])


class CheckedShard:
    """A shard's record batches, each checked as described in the module docstring before it is returned."""

    def __init__(self, source: pa.NativeFile, manifest: Manifest, shard: ShardInfo, *, remote: bool,
                 full: bool = False, hidden_layers: list[int] | None = None, fields: list[int] | None = None):
        self.source, self.manifest, self.shard, self.full = source, manifest, shard, full
        self.hidden_layers = set(hidden_layers or ())
        self._rows: dict[int, int] = {}
        self.expected_digests = shard.batch_sha256 if (remote or full) else []
        if remote and not shard.batch_sha256:
            raise KDCacheError(f"shard {shard.file} has no per-batch hashes (a cache dumped before kdcache recorded "
                               f"them): it cannot be checked while streamed; train with `read_through`")
        try:
            self.size = source.size()
            self.blocks = self._blocks()
            options = pa.ipc.IpcReadOptions(included_fields=None if remote else fields)
            self.reader = pa.ipc.open_file(source, options=options)
        except (OSError, pa.ArrowException, struct.error, IndexError) as error:
            raise self._error(f"is not a readable Arrow IPC file ({error})") from None
        if len(self.blocks) != self.reader.num_record_batches:
            raise self._error("has an inconsistent record batch table")
        expected = expected_schema(manifest)
        if options.included_fields:
            expected = pa.schema([expected.field(index) for index in fields], metadata=expected.metadata)
        # a merged cache keeps its sources' shards as they are: their metadata names the dump they came from
        fingerprint = (self.reader.schema.metadata or {}).get(b"kdcache.dump_fingerprint", b"")
        expected = expected.with_metadata({**expected.metadata, b"kdcache.dump_fingerprint": fingerprint})
        if (fingerprint.decode(errors="replace") not in manifest.shard_fingerprints
                or not self.reader.schema.equals(expected, check_metadata=True)):
            raise self._error(f"has schema {_names(self.reader.schema)} that does not match the manifest")
        if self.expected_digests and len(self.expected_digests) != len(self.blocks):
            raise self._error(f"has {len(self.blocks)} record batches, the manifest hashes "
                              f"{len(self.expected_digests)}")

    def _error(self, message: str) -> KDCacheError:
        return KDCacheError(f"shard {self.shard.file} {message}")

    @property
    def schema(self) -> pa.Schema:
        return self.reader.schema

    @property
    def num_record_batches(self) -> int:
        return len(self.blocks)

    def read_all(self) -> pa.Table:
        """Every record batch, checked, as one table."""
        return pa.Table.from_batches([self.get_batch(index) for index in range(self.num_record_batches)],
                                     schema=self.schema)

    def _blocks(self) -> list[tuple[int, int, int]]:
        """(offset, metadata length, body length) of each record batch, from the file footer."""
        tail = bytes(self.source.read_at(10, self.size - 10))
        if self.size < 24 or tail[4:] != b"ARROW1":
            raise struct.error("no Arrow file footer")
        footer_size = struct.unpack("<i", tail[:4])[0]
        if not 0 < footer_size <= self.size - 18:
            raise struct.error("bad footer size")
        footer = _root(bytes(self.source.read_at(footer_size, self.size - 10 - footer_size)))
        if footer.structs(2, "<qi4xq"):
            raise struct.error("dictionary batches are not part of the kdcache format")
        blocks = [(offset, meta, body) for offset, meta, body in footer.structs(3, "<qi4xq")]
        if any(offset < 8 or meta < 8 or body < 0 or offset + meta + body > self.size for offset, meta, body in blocks):
            raise struct.error("record batch block outside the file")
        return blocks

    def batch_rows(self, index: int) -> int:
        """The row count of record batch `index`, from its checked header: nothing is decoded."""
        if index not in self._rows:
            self._rows[index] = self._check_header(index)
        return self._rows[index]

    def _check_header(self, index: int) -> int:
        """Refuse a batch whose decoding could allocate more than the file holds, before decoding it;
        return its row count."""
        offset, meta_size, _ = self.blocks[index]
        try:
            meta = bytes(self.source.read_at(min(meta_size, 1 << 20), offset))
            start = 8 if meta[:4] == b"\xff\xff\xff\xff" else 4
            message = _root(meta[start:])
            header = message.table(2) if message.scalar(1, "<B") == _RECORD_BATCH else None
            if header is None:
                raise struct.error("not a record batch")
            rows, compressed = header.scalar(0, "<q"), header.table(3) is not None
            decoded = self._decoded_bytes(offset + meta_size, header.structs(2, "<qq")) if compressed else 0
        except (OSError, pa.ArrowException, struct.error, IndexError) as error:
            raise self._error(f"record batch {index} has an unreadable header ({error})") from None
        body = self.blocks[index][2]
        if decoded > MAX_EXPANSION * body + (1 << 16):
            raise self._error(f"record batch {index} would decode to {decoded:,} bytes from a {body:,}-byte body: "
                              f"refused before decompressing")
        if not 0 <= rows <= self.shard.rows:
            raise self._error(f"record batch {index} claims {rows} rows, the manifest gives the shard {self.shard.rows}")
        return rows

    def _decoded_bytes(self, body_offset: int, buffers: list[tuple[int, int]]) -> int:
        """What the compressed buffers of a body decode to: each starts with its decoded length as an
        int64 (-1: stored uncompressed), read here without decompressing anything."""
        total = 0
        for buffer_offset, length in buffers:
            if length < 8:
                continue
            (size,) = struct.unpack("<q", bytes(self.source.read_at(8, body_offset + buffer_offset)))
            total += length - 8 if size == -1 else size
            if size < -1:
                raise struct.error(f"negative decoded length {size}")
        return total

    def get_batch(self, index: int) -> pa.RecordBatch:
        self.batch_rows(index)
        try:
            batch = self.reader.get_batch(index)
            batch.validate(full=True)
        except (OSError, pa.ArrowException) as error:
            raise self._error(f"record batch {index} is malformed ({error})") from None
        if self.expected_digests and batch_digest(batch) != self.expected_digests[index]:
            raise self._error(f"record batch {index} does not match its hash in the manifest: the bytes read now "
                              f"differ from those the cache was made (and verified) with")
        check_batch(batch, self.manifest, lambda message: self._error(f"record batch {index}: {message}"),
                    floats=None if self.full else self.hidden_layers)
        return batch


def _names(schema: pa.Schema) -> str:
    """A schema's column names for a message; a damaged file's may not even be UTF-8."""
    try:
        return printable(schema.names)
    except UnicodeDecodeError:
        return "(column names that are not UTF-8)"


def _lengths(column: pa.Array) -> np.ndarray:
    return np.diff(column.offsets.to_numpy())


def _values(column: pa.Array, depth: int) -> np.ndarray:
    for _ in range(depth):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


_FLOAT16_EXPONENT = 0x7C00  # all exponent bits set: inf or NaN
_FLOAT16_SIGN = 0x8000


def _suspicious(values: np.ndarray, log_prob: bool, tail: bool) -> bool:
    """Whether `values` may hold NaN, inf (-inf is fine for a `tail`) or, for a `log_prob`, a value above the
    tolerance. The fast path of `check_batch`, which runs on every batch read: float32 needs a min and a max
    (NaN propagates into both); float16, which numpy handles slowly, is checked on its bit patterns.
    """
    if values.dtype == np.float16:
        bits = values.view(np.uint16)
        if not log_prob:
            return bool(((bits & _FLOAT16_EXPONENT) == _FLOAT16_EXPONENT).any())
        # valid: +0 .. +tolerance, and every finite negative (-0 .. the largest negative float16 below -inf)
        tolerance = np.float16(LOGPROB_TOLERANCE).view(np.uint16)
        return bool(((bits > tolerance) & (bits < _FLOAT16_SIGN)).any()
                    or (bits >= _FLOAT16_SIGN | _FLOAT16_EXPONENT).any())
    low, high = values.min(), values.max()
    upper_ok = high <= LOGPROB_TOLERANCE if log_prob else high < np.inf
    return not (upper_ok and (low > -np.inf or (tail and not np.isnan(low))))


def check_batch(batch: pa.RecordBatch, manifest: Manifest, error, floats: set[int] | None = None) -> None:
    """Raise `error(message)` unless every value a student consumes is in range and every list length agrees.

    `floats`: the hidden layers whose values are checked for NaN/inf (None: all, and the pooled output).
    Columns the batch does not hold (a reader asked for fewer) are skipped.
    """
    columns = dict(zip(batch.schema.names, batch.columns))
    if "input_ids" not in columns:
        return
    tokens = _lengths(columns["input_ids"])
    targets = _lengths(columns["target_positions"]) if "target_positions" in columns else tokens
    classes = manifest.num_classes

    def lengths(name: str, expected: np.ndarray, what: str) -> None:
        if name in columns and not np.array_equal(_lengths(columns[name]), expected):
            raise error(f"`{name}` lists do not have one entry per {what}")

    def in_range(name: str, depth: int, low: int, high: int, allowed: int | None = None) -> None:
        if name not in columns:
            return
        values = _values(columns[name], depth)
        if not values.size or low <= values.min() and values.max() < high:  # two reductions, no mask
            return
        bad = (values < low) | (values >= high)
        if allowed is not None:
            bad &= values != allowed
        if bad.any():
            raise error(f"`{name}` holds {int(values[bad][0])}, outside [{low}, {high})")

    def finite(name: str, depth: int, log_prob: bool = False, tail: bool = False) -> None:
        """No NaN or inf; a log-prob is also at most 0, and a tail log-mass may be -inf (top-k covered all)."""
        if name not in columns:
            return
        values = _values(columns[name], depth)
        if not values.size or not _suspicious(values, log_prob, tail):
            return
        bad = np.isnan(values) | (values == np.inf)
        if not tail:
            bad |= values == -np.inf
        if log_prob:
            bad |= values > LOGPROB_TOLERANCE
        raise error(f"`{name}` holds {values[bad][0]}" + (", not a log-probability" if log_prob else ""))

    max_length = manifest.settings.get("max_length")
    if max_length is not None and tokens.size and tokens.max() > max_length:  # attention costs length²
        raise error(f"a row holds {int(tokens.max())} tokens, more than the manifest's `settings.max_length` {max_length}")
    in_range("input_ids", 1, 0, manifest.vocab_size)
    lengths("token_type_ids", tokens, "token")
    in_range("token_type_ids", 1, 0, 2)
    if "target_positions" in columns:
        positions = _values(columns["target_positions"], 1)
        if positions.size and ((positions < 0) | (positions >= np.repeat(tokens, targets))).any():
            raise error("`target_positions` points outside its row")
    lengths("labels", targets, "target position")
    in_range("labels", 1, 0, classes, allowed=IGNORE_LABEL)
    if manifest.codec.layout == "compact":
        if floats is None:  # a streamed batch's compact targets are checked as they are decoded (reader.py)
            _check_compact_targets(batch, manifest, targets, error)
    else:
        _check_plain_targets(columns, targets, classes, lengths, in_range, finite, error)
    for layer in manifest.hidden_layers:
        lengths(f"hidden_{layer}", tokens, "token")
        if floats is None or layer in floats:
            finite(f"hidden_{layer}", 2)
    lengths("pooled", np.ones_like(tokens), "row")
    if floats is None:
        finite("pooled", 2)


def _check_compact_targets(batch: pa.RecordBatch, manifest: Manifest, targets: np.ndarray, error) -> None:
    """The codec decodes and range-checks compact targets (kdcache/cache/codecs.py); each row must also
    hold one target per target position."""
    limits = Limits(manifest.num_classes, manifest.top_k, manifest.draws)
    try:
        columns, ragged = decode_targets(batch, manifest.codec, limits, "")
    except KDCacheError as problem:
        raise error(str(problem).strip()) from None
    for name, (row_offsets, _) in {**columns, **ragged}.items():
        if not np.array_equal(np.diff(row_offsets), targets):
            raise error(f"`{name}` lists do not have one entry per target position")


def _check_plain_targets(columns: dict, targets: np.ndarray, classes: int, lengths, in_range, finite, error) -> None:
    for name in ("topk_ids", "topk_logprobs", "tail_logprob", "sampled_ids", "sampled_counts"):
        lengths(name, targets, "target position")
    in_range("topk_ids", 2, 0, classes)
    finite("topk_logprobs", 2, log_prob=True)
    finite("tail_logprob", 1, log_prob=True, tail=True)
    if "sampled_ids" in columns:
        if not np.array_equal(_lengths(columns["sampled_ids"].flatten()), _lengths(columns["sampled_counts"].flatten())):
            raise error("`sampled_ids` and `sampled_counts` lists differ in length")
        in_range("sampled_ids", 2, 0, classes)
        in_range("sampled_counts", 2, 1, 2**16)


def check_unique_sample_ids(ids_per_shard: list[np.ndarray], manifest: Manifest) -> None:
    """Refuse a cache listing a sample id twice: splits, resume offsets and equal shares count on uniqueness."""
    ids = np.concatenate(ids_per_shard) if ids_per_shard else np.zeros(0, dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = int(unique[counts > 1][0])
        shards = [manifest.shards[index].file for index, shard_ids in enumerate(ids_per_shard) if repeated in shard_ids]
        raise KDCacheError(f"sample id {repeated} appears {int(counts[counts > 1][0])} times in the cache "
                           f"({', '.join(shards)}): sample ids must be unique")


def open_checked(store, manifest: Manifest, shard: ShardInfo, *, full: bool = False,
                 hidden_layers: list[int] | None = None, fields: list[int] | None = None) -> CheckedShard:
    """Open `shard` of the cache in `store` for checked reading (see `CheckedShard`).

    `full` (verify): check every batch's digest and every float column. `fields` limits the columns
    decoded from a local file (a remote one is decoded whole, so its digest can be checked).
    """
    source, remote = store.source(shard)
    return CheckedShard(source, manifest, shard, remote=remote, full=full, hidden_layers=hidden_layers,
                        fields=fields)
