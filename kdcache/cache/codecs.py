"""Target codecs: how a cache stores its targets, and how they are encoded and decoded (format 2).

A cache's *decoded view* is the same whatever the codec (`CachedSequence`): per target position a
padded row of listed ids with their log-probs (-inf marks an empty slot), the exact tail log-mass,
and ragged sampled ids with counts. The codec only decides the bytes on disk:

* ``plain`` (format 1): top-k as list<fixed_size_list<id>[k]> and float16/float32 log-probs,
  sampled targets as list<list<...>> with uint16 counts. Kept so that caches stay readable by
  every kdcache that reads format 1.
* ``compact`` (format 2): every target column is one flat list per row plus a per-position length
  column (no per-position offsets); ids within a position are ascending and stored as *gaps*
  (the first id, then differences), which entropy coders like zstd shrink far better than raw ids;
  log-probs may be 8-bit codes in the log domain (``lp = -code * logprob_step``); counts are uint8
  when the draws fit. The exact tail stays float32. docs/format.md ("Format versions 2 and 3") is the byte-level spec.
* ``compact`` with id planes (format 3, what a compact dump writes): the same, except that the
  sampled ids' gaps are split into byte planes, the low byte in `sampled_ids` and the rest in
  `sampled_ids_high`. The high bytes of gaps are mostly 0, so zstd, which sees each plane as a run
  of its own, packs the two planes 8-13% smaller than the interleaved uint16 gaps (measured on
  SmolLM2 and MiniLM-vocabulary caches, docs/frontier.md); the top-k ids, a few per position, do not gain.

* ``compact`` with an id ranking (format 4, what `kdcache recode` writes where it pays): the same, except that ids are
  *numbered* before gap coding: the cache's most frequent ids (up to 4,096, listed in the manifest) get
  numbers 0, 1, ..., and every other id follows in ascending order. Frequent ids then sit close
  together, so the gaps are small: 10-14% fewer bytes of ids, 8-10% of the whole cache, on SmolLM2 and
  MiniLM-vocabulary caches (docs/frontier.md). Lossless; the decoded view is unchanged.

Whatever the codec, the decoded view lists each position's top-k by descending probability (ties by ascending
id in compact caches), as format 1 stores them; sampled ids are ascending.

Shards of either codec may use Arrow IPC buffer compression (zstd), which pyarrow and `datasets`
undo transparently. Everything read from a shard is validated before use: lengths bounded by the
manifest, lengths consistent with the flat columns, ids below the vocabulary, finite values.
Only numpy and pyarrow here: a cache is readable without torch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import KDCacheError

LAYOUTS = ("compact", "plain")
LOGPROB_TYPES = ("uint8", "float16", "float32")
COMPRESSIONS = ("zstd", "none")
# 8-bit codes cover log-probs in [-255/16, 0] = [-15.94, 0] nats with a rounding error of at most
# 1/32 nat (3% of a probability); anything smaller is stored as e^-15.94, a mass of < 1.2e-7.
LOGPROB_STEP = 1.0 / 16
MAX_CODE = 255
MAX_RANKED_IDS = 4096  # ids a ranking lists; past ~4k, ranking the rest saved < 3% more (docs/frontier.md)
_NEG_INF = float("-inf")
# The decoded view pads every position of a record batch to its widest: at most this many slots per stored
# entry (a mass-adaptive head of k 64 listing 1 id at most positions pads 64x), plus a floor of slots.
MAX_PADDING = 64
PADDING_FLOOR = 1 << 16


@dataclasses.dataclass
class Ragged:
    """A variable-length list per token position: position t holds `values[offsets[t]:offsets[t + 1]]`."""

    values: np.ndarray
    offsets: np.ndarray  # int [L + 1], offsets[0] = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def positions(self, span: slice) -> Ragged:
        """The lists of positions `span` (step 1), re-based to start at offset 0."""
        offsets = self.offsets[span.start:span.stop + 1]
        return Ragged(values=self.values[offsets[0]:offsets[-1]], offsets=offsets - offsets[0])

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        return cls(values=values, offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one cache stores its targets; recorded in the manifest's `columns.codec` (format 2)."""

    layout: str = "plain"
    logprobs: str = "float16"        # uint8 (log-domain codes), float16 or float32
    compression: str = "none"        # Arrow IPC buffer compression of the shard files
    draws_from: str = "teacher"      # sampled ids drawn from the whole distribution, or from the tail
    id_planes: bool = False          # compact sampled-id gaps split into a low-byte and a high-part column
    id_ranking: tuple[int, ...] = ()  # compact ids numbered by this ranking before gap coding (most frequent first)

    @property
    def format_version(self) -> int:
        """The lowest format version that can read the cache: plain caches stay readable by format-1 readers,
        compact ones without id planes by format-2 readers (a format-2 reader would misread the planes), and
        without a ranking by format-3 readers (which would take the numbers for ids)."""
        return 4 if self.id_ranking else 3 if self.id_planes else 2 if self.layout == "compact" else 1

    @property
    def ids(self) -> str:
        return "gap-planes" if self.id_planes else "gaps" if self.layout == "compact" else "plain"

    def to_manifest(self) -> dict[str, Any]:
        return {"layout": self.layout, "logprobs": self.logprobs, "compression": self.compression,
                "draws_from": self.draws_from, "ids": self.ids,
                **({"logprob_step": LOGPROB_STEP} if self.logprobs == "uint8" else {}),
                **({"id_ranking": list(self.id_ranking)} if self.id_ranking else {})}

    @classmethod
    def from_manifest(cls, columns: dict[str, Any], settings: dict[str, Any]) -> Codec:
        """A format-1 manifest has no codec entry: plain, with the dump's `logprob_dtype`."""
        stored = columns.get("codec")
        if stored is None:
            return cls(logprobs=settings.get("logprob_dtype", "float16"))
        if not isinstance(stored, dict):
            raise KDCacheError(f"unsupported target codec in the manifest: {stored!r}")
        codec = cls(layout=stored.get("layout"), logprobs=stored.get("logprobs"), compression=stored.get("compression"),
                    draws_from=stored.get("draws_from", "teacher"), id_planes=stored.get("ids") == "gap-planes",
                    id_ranking=_checked_ranking(stored.get("id_ranking", [])))
        if (codec.layout not in LAYOUTS or codec.logprobs not in LOGPROB_TYPES or codec.compression not in COMPRESSIONS
                or codec.draws_from not in ("teacher", "tail") or stored.get("ids", codec.ids) != codec.ids
                or (codec.logprobs == "uint8" and stored.get("logprob_step") != LOGPROB_STEP)
                or (codec.layout == "plain" and (codec.logprobs == "uint8" or codec.id_planes or codec.id_ranking))):
            raise KDCacheError(f"unsupported target codec in the manifest: "
                               f"{ {key: value for key, value in stored.items() if key != 'id_ranking'} }")
        return codec

    def write_options(self) -> pa.ipc.IpcWriteOptions | None:
        return pa.ipc.IpcWriteOptions(compression="zstd") if self.compression == "zstd" else None


def _checked_ranking(ranking: Any) -> tuple[int, ...]:
    """A manifest's `id_ranking`: at most MAX_RANKED_IDS distinct ids ≥ 0 (the vocabulary bound is checked
    where the manifest's is known)."""
    if (not isinstance(ranking, list) or len(ranking) > MAX_RANKED_IDS
            or not all(type(value) is int and value >= 0 for value in ranking) or len(set(ranking)) != len(ranking)):
        raise KDCacheError(f"codec id_ranking must list at most {MAX_RANKED_IDS} distinct ids ≥ 0")
    return tuple(ranking)


@functools.lru_cache(maxsize=8)
def _ranked(ranking: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the ranking as an array, its ids ascending, the number of each of those)."""
    ranked = np.asarray(ranking, dtype=np.int64)
    order = np.argsort(ranked, kind="stable")
    return ranked, ranked[order], order


def id_numbers(ids: np.ndarray, ranking: tuple[int, ...]) -> np.ndarray:
    """The number each id is stored as: its place in `ranking`, or, for an id it does not list, the ranking's
    length plus the id's place among the unlisted ids (int64; the identity without a ranking)."""
    ids = ids.astype(np.int64)
    if not ranking:
        return ids
    _, ascending, numbers = _ranked(ranking)
    below = np.searchsorted(ascending, ids)  # listed ids smaller than each id
    listed = ascending[np.minimum(below, len(ascending) - 1)] == ids
    return np.where(listed, numbers[np.minimum(below, len(ascending) - 1)], len(ascending) + ids - below)


def numbered_ids(numbers: np.ndarray, ranking: tuple[int, ...]) -> np.ndarray:
    """Inverse of `id_numbers`. The j-th unlisted id is j plus the listed ids below it; listed id i (ascending)
    has `ascending[i] - i` unlisted ids below it, so those not above j are counted by one search."""
    if not ranking:
        return numbers
    ranked, ascending, _ = _ranked(ranking)
    unlisted = numbers - len(ranked)
    after = unlisted + np.searchsorted(ascending - np.arange(len(ascending)), unlisted, side="right")
    return np.where(unlisted < 0, ranked[np.minimum(numbers, len(ranked) - 1)], after)


def _ascending_within(keys: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The permutation that sorts the flat entries of each position by `keys` (ids or numbers, ≥ 0), positions
    kept in order: one sort of position · span + key, ~10× faster than `np.lexsort` on the two."""
    span = int(keys.max(initial=0)) + 1
    return np.argsort(np.repeat(np.arange(len(lengths), dtype=np.int64) * span, lengths) + keys)


def round_logprobs(logprobs, step: float = LOGPROB_STEP):
    """What an 8-bit log-domain code decodes to: ``-round(-lp / step) * step``, clipped to the code range.

    Written on array methods only, so the dump applies it to torch tensors on the device (for the
    fidelity card) and the encoder to numpy arrays, with one rule. -inf (an empty slot) maps to the
    smallest code; callers keep empty slots out by their lengths.
    """
    return -(-logprobs / step).round().clip(0, MAX_CODE) * step


def narrowest_uint(largest: int) -> pa.DataType:
    return pa.uint8() if largest <= 2**8 - 1 else pa.uint16() if largest <= 2**16 - 1 else pa.uint32()


def high_part_type(vocab_size: int) -> pa.DataType:
    """The type of `sampled_ids_high`: the narrowest holding (vocab_size - 1) >> 8 (uint8 up to 65,536 ids)."""
    return narrowest_uint(max(vocab_size - 1, 0) >> 8)


def compact_fields(*, id_type: pa.DataType, groups: tuple[str, ...], codec: Codec, top_k: int,
                   draws: int | None, vocab_size: int) -> list[pa.Field]:
    """The compact target columns, in schema order (see docs/format.md, "Format versions 2 and 3")."""
    logprob_type = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}[codec.logprobs]
    fields = []
    if "topk" in groups:
        fields += [pa.field("topk_lengths", pa.list_(narrowest_uint(top_k)), nullable=False),
                   pa.field("topk_ids", pa.list_(id_type), nullable=False),
                   pa.field("topk_logprobs", pa.list_(logprob_type), nullable=False),
                   pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False)]
    if "sampled" in groups:
        count_type = narrowest_uint(draws)
        fields += [pa.field("sampled_lengths", pa.list_(count_type), nullable=False),
                   pa.field("sampled_ids", pa.list_(pa.uint8() if codec.id_planes else id_type), nullable=False),
                   *([pa.field("sampled_ids_high", pa.list_(high_part_type(vocab_size)), nullable=False)]
                     if codec.id_planes else []),
                   pa.field("sampled_counts", pa.list_(count_type), nullable=False)]
    return fields


# --------------------------------------------------------------------------- encoding


def _gaps(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Ascending ids per position → the first id, then differences (int64)."""
    gaps = ids.astype(np.int64)
    gaps[1:] -= gaps[:-1].copy()
    starts = np.cumsum(lengths) - lengths
    starts = starts[lengths > 0]
    gaps[starts] = ids[starts]
    return gaps


def _ungap(gaps: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Inverse of `_gaps`: a running sum restarted at every position (int64)."""
    total = np.cumsum(gaps, dtype=np.int64)
    before = np.concatenate([[0], total])[np.cumsum(lengths) - lengths]
    return total - np.repeat(before, lengths)


def encode_head(ids: np.ndarray, logprobs: np.ndarray, codec: Codec) -> dict[str, np.ndarray]:
    """Compact top-k columns of one row from its decoded [L, k] ids and log-probs (-inf = empty slot)."""
    listed = logprobs > _NEG_INF
    numbers = id_numbers(ids, codec.id_ranking)
    order = np.argsort(np.where(listed, numbers, np.iinfo(np.int64).max), axis=1, kind="stable")
    numbers, logprobs = np.take_along_axis(numbers, order, 1), np.take_along_axis(logprobs, order, 1)
    listed = np.take_along_axis(listed, order, 1)
    lengths = listed.sum(1)
    values = logprobs[listed]
    if codec.logprobs == "uint8":
        values = (-values.astype(np.float32) / LOGPROB_STEP).round().clip(0, MAX_CODE).astype(np.uint8)
    return {"topk_lengths": lengths, "topk_ids": _gaps(numbers[listed], lengths), "topk_logprobs": values}


def encode_row(row, codec: Codec) -> dict[str, np.ndarray]:
    """The compact target columns of one decoded row (`CachedSequence`); its other columns are stored as is."""
    encoded = {}
    if row.topk_ids is not None:
        encoded |= encode_head(row.topk_ids, row.topk_logprobs, codec)
    if row.sampled_ids is not None:
        lengths = row.sampled_ids.lengths()
        numbers = id_numbers(row.sampled_ids.values, codec.id_ranking)
        order = _ascending_within(numbers, lengths)
        gaps = _gaps(numbers[order], lengths)
        encoded |= {"sampled_lengths": lengths, "sampled_counts": row.sampled_counts.values[order]}
        encoded |= {"sampled_ids": gaps & 0xFF, "sampled_ids_high": gaps >> 8} if codec.id_planes else \
            {"sampled_ids": gaps}
    return encoded


# --------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the manifest promises about every target position; a shard that breaks it is refused."""

    vocab_size: int
    top_k: int
    draws: int | None


def _flat(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row offsets re-based to 0, flat values) of a list<primitive> column."""
    column = batch.column(name)
    offsets = column.offsets.to_numpy()
    return offsets - offsets[0], column.flatten().to_numpy(zero_copy_only=False)


def _lengths_and_entries(batch: pa.RecordBatch, prefix: str, value_columns: tuple[str, ...], limit: int,
                         file: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per-position lengths (bounded by `limit`) and the flat entry columns, checked to agree row by row."""
    position_offsets, lengths = _flat(batch, f"{prefix}_lengths")
    lengths = lengths.astype(np.int64)
    if len(lengths) and lengths.max() > limit:
        raise KDCacheError(f"{file}: a position lists {lengths.max()} {prefix} entries, the manifest allows {limit}")
    entry_offsets = np.concatenate([[0], np.cumsum(lengths)])[position_offsets]
    entries = {}
    for name in value_columns:
        offsets, values = _flat(batch, name)
        if not np.array_equal(offsets, entry_offsets):
            raise KDCacheError(f"{file}: column {name} does not hold the entries its {prefix}_lengths announce")
        entries[name] = values
    return position_offsets, lengths, entries


def _checked_ids(gaps: np.ndarray, lengths: np.ndarray, vocab_size: int, name: str, file: str) -> np.ndarray:
    gaps = gaps.astype(np.int64)
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    later = np.ones(len(gaps), dtype=bool)
    later[starts] = False
    if (gaps[later] <= 0).any():
        raise KDCacheError(f"{file}: {name} are not strictly ascending within a position")
    ids = _ungap(gaps, lengths)
    if len(ids) and ids.max() >= vocab_size:
        raise KDCacheError(f"{file}: {name} holds id {ids.max()}, outside the vocabulary of {vocab_size}")
    return ids


def _ids(gaps: np.ndarray, lengths: np.ndarray, vocab_size: int, name: str, file: str, codec: Codec
         ) -> tuple[np.ndarray, np.ndarray | slice]:
    """(ids ascending within each position, the permutation their companion entries take) of one id column."""
    numbers = _checked_ids(gaps, lengths, vocab_size, name, file)
    if not codec.id_ranking:
        return numbers, slice(None)
    ids = numbered_ids(numbers, codec.id_ranking)
    order = _ascending_within(ids, lengths)
    return ids[order], order


def _padded(values: np.ndarray, lengths: np.ndarray, fill, dtype, file: str) -> np.ndarray:
    """Flat entries → [P, max length] rows, `fill` in the empty slots.

    The padding is bounded by what was read: at most `MAX_PADDING` slots per stored entry (plus a small
    floor), so one position listing 20,000 ids in a small shard is refused instead of padding every other
    position of its batch to 20,000 slots.
    """
    width = int(lengths.max(initial=0))
    if width * len(lengths) > MAX_PADDING * len(values) + PADDING_FLOOR:
        raise KDCacheError(f"{file}: a position lists {width} entries while the batch's {len(lengths)} positions list "
                           f"{len(values)} in all: padding them to {width} would take {MAX_PADDING}x more than "
                           f"the stored entries; refused")
    if len(values) == width * len(lengths):
        return values.astype(dtype, copy=False).reshape(len(lengths), width)
    out = np.full((len(lengths), width), fill, dtype=dtype)
    out[np.arange(width)[None, :] < lengths[:, None]] = values
    return out


def most_probable_first(ids: np.ndarray, logprobs: np.ndarray, ranks: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """[P, k] top-k ids and log-probs with each position's entries by descending probability, ties in the order
    given (ascending id for compact caches), empty slots (at the end of a row) last: the one order of the decoded
    view, whatever the codec, the order format 1 stores and peers (axolotl, DistillKit) assume.

    `ranks` (default -logprobs) orders the same way; 8-bit codes are passed as they are, for numpy sorts
    small integers several times faster than floats. Rows already in order (format 1 as written) are
    returned as they are."""
    ranks = -logprobs if ranks is None else ranks
    if (ranks[:, :-1] <= ranks[:, 1:]).all():
        return ids, logprobs
    order = np.argsort(ranks, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def decode_targets(batch: pa.RecordBatch, codec: Codec, limits: Limits, file: str
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[np.ndarray, Ragged]]]:
    """The decoded target columns of one compact record batch, over every position of the batch.

    Returns (per-row columns, ragged columns) in the reader's forms: `name -> (row offsets over
    positions, values)`, with top-k as [P, k] ids (int64) and float32 log-probs (-inf = empty slot) by
    descending probability (`most_probable_first`), and sampled ids/counts as `Ragged` over the positions
    (ascending ids).
    """
    names = set(batch.schema.names)
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ragged: dict[str, tuple[np.ndarray, Ragged]] = {}
    if codec.id_ranking and max(codec.id_ranking) >= limits.vocab_size:
        raise KDCacheError(f"{file}: the codec's id ranking lists id {max(codec.id_ranking)}, outside the vocabulary "
                           f"of {limits.vocab_size}")
    if "topk_lengths" in names:
        rows, lengths, entries = _lengths_and_entries(batch, "topk", ("topk_ids", "topk_logprobs"), limits.top_k, file)
        ids, order = _ids(entries["topk_ids"], lengths, limits.vocab_size, "topk_ids", file, codec)
        stored = entries["topk_logprobs"][order]
        logprobs = (-LOGPROB_STEP * stored.astype(np.float32) if codec.logprobs == "uint8"
                    else stored.astype(np.float32))
        if not (logprobs <= 0).all():
            raise KDCacheError(f"{file}: topk_logprobs holds values that are not finite log-probabilities")
        tail_offsets, tail = _flat(batch, "tail_logprob")
        if not np.array_equal(tail_offsets, rows) or np.isnan(tail).any() or (tail > 0).any():
            raise KDCacheError(f"{file}: tail_logprob is not one log-mass ≤ 0 per target position")
        ids, logprobs = most_probable_first(
            _padded(ids, lengths, 0, np.int64, file), _padded(logprobs, lengths, _NEG_INF, np.float32, file),
            _padded(stored, lengths, MAX_CODE, np.uint8, file) if codec.logprobs == "uint8" else None)
        columns |= {"topk_ids": (rows, ids), "topk_logprobs": (rows, logprobs),
                    "tail_logprob": (rows, tail)}
    if "sampled_lengths" in names:
        planes = ("sampled_ids_high",) if codec.id_planes else ()
        rows, lengths, entries = _lengths_and_entries(batch, "sampled", ("sampled_ids", *planes, "sampled_counts"),
                                                      limits.draws, file)
        gaps = entries["sampled_ids"].astype(np.int64)
        if codec.id_planes:
            gaps |= entries["sampled_ids_high"].astype(np.int64) << 8
        ids, order = _ids(gaps, lengths, limits.vocab_size, "sampled_ids", file, codec)
        counts = entries["sampled_counts"].astype(np.int64)[order]
        owner = np.repeat(np.arange(len(lengths)), lengths)
        per_position = np.bincount(owner, weights=counts, minlength=len(lengths))
        # draws from the whole distribution are N at every position; from the tail, up to N (none where the head
        # lists every id, fewer where they are in proportion to the tail mass)
        allowed = ((per_position <= limits.draws) if codec.draws_from == "tail" else (per_position == limits.draws))
        if not allowed.all() or (counts <= 0).any():
            raise KDCacheError(f"{file}: sampled_counts do not add up to "
                               f"{'at most ' if codec.draws_from == 'tail' else ''}{limits.draws} draws at every position")
        ragged |= {"sampled_ids": (rows, Ragged.from_lengths(ids, lengths)),
                   "sampled_counts": (rows, Ragged.from_lengths(counts, lengths))}
    return columns, ragged
