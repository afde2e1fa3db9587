"""The cache contract: directory layout, Arrow schema, manifest and fingerprints.

Everything another team relies on when it receives a cache lives here, so the contract can be
read in one file; docs/format.md is its specification for humans (versioned with FORMAT_VERSION:
change both together). A cache is complete exactly when `kdcache.json` exists: the dump writes
it last, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from ..errors import KDCacheError
from .codecs import Codec, compact_fields

FORMAT_VERSION = 4  # the newest this kdcache reads; a cache records the lowest that reads it (Codec.format_version)
# "head-tail": the exact top-k head and tail mass (topk columns) plus draws from the renormalised tail (sampled columns).
TARGET_TYPES = ("topk", "sampled", "head-tail")
MAX_SAMPLES = 2**16 - 1  # sampled counts are uint16
MANIFEST_NAME = "kdcache.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
TEACHERS_DIR = "teachers"  # a multi-teacher cache's other teachers, each a complete cache: teachers/<name>/
SHARD_SUFFIX = ".arrow"
PARTIAL_SUFFIX = ".partial"


class StoredType(NamedTuple):
    """One element type a column may be stored as, in each library that handles it.

    `torch` names (cache/ does not import torch) the dtype a training batch holds the values in:
    ids widen to int64 (what embeddings and gather index with), floats to float32 (loss arithmetic).
    """

    arrow: pa.DataType
    numpy: type
    torch: str


STORED_TYPES = {
    "int8": StoredType(pa.int8(), np.int8, "int64"),
    "int32": StoredType(pa.int32(), np.int32, "int64"),
    "int64": StoredType(pa.int64(), np.int64, "int64"),
    "uint16": StoredType(pa.uint16(), np.uint16, "int64"),
    "uint32": StoredType(pa.uint32(), np.uint32, "int64"),
    "float16": StoredType(pa.float16(), np.float16, "float32"),
    "float32": StoredType(pa.float32(), np.float32, "float32"),
    "str": StoredType(pa.string(), str, "str"),  # text: read as Python str, never a tensor
}

HIDDEN_PREFIX = "hidden_"
POOLED_COLUMN = "pooled"

# Every column of the plain (format-1) layout and the element types it may be stored as (docs/format.md
# says what each holds). Two are chosen per cache: ids by the number of classes (`token_id_type`),
# log-probs by the dump's `logprob_dtype`; every alternative of a column widens to the same torch dtype.
# The compact layout's target columns (per-position lengths, gap-coded ids, 8-bit codes) are declared
# with their encoding in codecs.py (`compact_fields`); they decode to these columns' batch dtypes.
COLUMNS: dict[str, tuple[str, ...]] = {
    "sample_id": ("int64",),
    "input_ids": ("int32",),
    "topk_ids": ("uint16", "uint32"),
    "topk_logprobs": ("float16", "float32"),
    "tail_logprob": ("float32",),
    "sampled_ids": ("uint16", "uint32"),
    "sampled_counts": ("uint16",),
    "token_type_ids": ("int8",),
    "target_positions": ("int32",),
    "labels": ("int32",),
    "position_ids": ("int32",),
    "token_offsets": ("int32",),
    "text": ("str",),
    HIDDEN_PREFIX: ("float16",),  # hidden_<layer>
    POOLED_COLUMN: ("float16",),
}


def arrow_type(column: str) -> pa.DataType:
    """The Arrow element type of a column with one stored type."""
    (stored,) = COLUMNS[column]
    return STORED_TYPES[stored].arrow


def batch_dtype(column: str) -> str:
    """The torch dtype (by name) a batch holds `column` in (`hidden_<i>`: pass "hidden_")."""
    return STORED_TYPES[COLUMNS[column][0]].torch


def token_id_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type holding every id: uint16 halves the id bytes of most vocabularies."""
    return STORED_TYPES["uint16" if vocab_size <= 2**16 else "uint32"].arrow


def column_groups(target_types: tuple[str, ...]) -> tuple[str, ...]:
    """Which groups of target columns the shards hold: head-tail caches hold both the top-k and the sampled ones."""
    return tuple(group for group in ("topk", "sampled")
                 if group in target_types or "head-tail" in target_types)


def hidden_column(layer: int) -> str:
    """Column name of hidden layer `layer` (non-negative, Hugging Face `hidden_states` index)."""
    return f"{HIDDEN_PREFIX}{layer}"


# Columns only some tasks write (see kdcache/tasks/), in schema order, after the target columns.
# `target_positions`: which token each target belongs to (absent = every position, the causal-LM case; a causal-LM
# import keeps the positions its source trains on);
# `labels`: the gold class of each target; `token_type_ids`: segment ids of text pairs;
# `token_offsets` + `text`: each token's [start, end) character span in the row's text, and that text
# (causal LM from text with a fast tokenizer), so a student with another tokenizer can be aligned later.
# `position_ids`: causal-LM rows packing several documents, positions restarting at 0 at each
# document's first token (a document sees only itself: see kdcache/tasks/base.py, "Packed documents").
OPTIONAL_COLUMNS = {name: pa.list_(arrow_type(name))
                    for name in ("token_type_ids", "target_positions", "labels", "position_ids")}
OPTIONAL_COLUMNS |= {"token_offsets": pa.list_(pa.list_(arrow_type("token_offsets"), 2)), "text": arrow_type("text")}


def shard_schema(*, top_k: int, vocab_size: int, logprob_dtype: str, hidden_sizes: dict[int, int],
                 dump_fingerprint: str, target_types: tuple[str, ...] = ("topk",),
                 optional_columns: tuple[str, ...] = (), pooled_size: int | None = None,
                 codec: Codec = Codec(), draws: int | None = None) -> pa.Schema:
    """The Arrow schema of every shard of one cache.

    `vocab_size` is the number of classes the targets range over (the tokenizer's vocabulary for
    a causal LM, the label set for classification); it picks the id type. The dump fingerprint is also stored in each shard's schema metadata, so a shard that strays
    into another cache directory can be recognised (Megatron's logits saver does the same).
    Plain sampled targets have a variable number of distinct ids per position, hence list<list<...>>;
    the compact codec's target columns (kdcache/cache/codecs.py) replace the plain ones.
    """
    id_type = token_id_type(vocab_size)
    groups = column_groups(target_types)
    fields = [
        pa.field("sample_id", arrow_type("sample_id"), nullable=False),
        pa.field("input_ids", pa.list_(arrow_type("input_ids")), nullable=False),
    ]
    if codec.layout == "compact":
        fields += compact_fields(id_type=id_type, groups=groups, codec=codec, top_k=top_k, draws=draws,
                                 vocab_size=vocab_size)
    elif "topk" in groups:
        logprob_type = STORED_TYPES[logprob_dtype].arrow
        fields += [
            pa.field("topk_ids", pa.list_(pa.list_(id_type, top_k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(logprob_type, top_k)), nullable=False),
            pa.field("tail_logprob", pa.list_(arrow_type("tail_logprob")), nullable=False),
        ]
    if "sampled" in groups and codec.layout == "plain":
        fields += [
            pa.field("sampled_ids", pa.list_(pa.list_(id_type)), nullable=False),
            pa.field("sampled_counts", pa.list_(pa.list_(arrow_type("sampled_counts"))), nullable=False),
        ]
    fields += [pa.field(name, column_type, nullable=False) for name, column_type in OPTIONAL_COLUMNS.items()
               if name in optional_columns]
    fields += [pa.field(hidden_column(layer), pa.list_(pa.list_(arrow_type(HIDDEN_PREFIX), size)), nullable=False)
               for layer, size in sorted(hidden_sizes.items())]
    if pooled_size is not None:  # an encoder's pooled output: one [d] vector per row
        fields.append(pa.field(POOLED_COLUMN, pa.list_(pa.list_(arrow_type(POOLED_COLUMN), pooled_size)), nullable=False))
    metadata = {"kdcache.format_version": str(codec.format_version), "kdcache.dump_fingerprint": dump_fingerprint}
    if codec.id_ranking:  # the shards' numbers mean ids only under this ranking: a manifest with another is refused
        metadata["kdcache.id_ranking_sha256"] = sha256_json(list(codec.id_ranking))
    return pa.schema(fields, metadata=metadata)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """A stable hash of JSON-able data (sorted keys), for fingerprints."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Vocabulary size plus a hash of the vocabulary and special tokens.

    Two tokenizers with the same fingerprint map text to the same ids, which is what a student
    needs to learn from the cached targets; the tokenizer class name is informative only.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())}
    return {
        "vocab_size": len(tokenizer),
        "hash": sha256_json({"vocab": vocab, "special_tokens": special}),
        "class": type(tokenizer).__name__,
    }


def tokenizer_file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file of a saved tokenizer, by name: the bytes a student will load and ship."""
    return tokenizer_files(directory)["files"]


def tokenizer_files(directory: Path) -> dict[str, dict]:
    """The manifest's record of a saved tokenizer's files: `files` (sha256 by name) and `file_bytes` (size by
    name, so a download of one stops at its declared size, as a shard's does)."""
    paths = [path for path in sorted(Path(directory).iterdir()) if path.is_file()]
    return {"files": {path.name: sha256_file(path) for path in paths},
            "file_bytes": {path.name: path.stat().st_size for path in paths}}


@dataclasses.dataclass
class ShardInfo:
    file: str  # relative to the cache directory, e.g. "data/shard-00000-00000.arrow"
    rows: int
    tokens: int
    bytes: int
    sha256: str
    # sha256 of each record batch's decoded buffers (`batch_digest`), so a remote shard streamed with
    # ranged reads is checked batch by batch as it is consumed, not only when `verify` hashed it.
    batch_sha256: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Manifest:
    """The content of `kdcache.json`: what the cache holds and how it was made."""

    task: str
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    columns: dict[str, Any]
    dump_fingerprint: str
    shards: list[ShardInfo] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kdcache_version: str = ""
    created_at: str = ""
    labels: list[str] = dataclasses.field(default_factory=list)  # class names by id (classification tasks)
    # caches this one was cut from or merged from (`kdcache copy --rows`, `kdcache merge`): where each row came from
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # a multi-teacher cache (`kdcache merge --teachers`, kdcache/cache/teachers.py): every teacher, this cache's
    # own first; empty, and then absent from kdcache.json, for a cache of one teacher
    teachers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def num_classes(self) -> int:
        """How many classes the cached distributions range over: the labels, else the vocabulary."""
        return len(self.labels) if self.labels else self.vocab_size

    @property
    def pooled_size(self) -> int | None:
        return self.columns.get("pooled_size")

    @property
    def optional_columns(self) -> tuple[str, ...]:
        return tuple(self.columns.get("optional", ()))

    @property
    def top_k(self) -> int:
        return int(self.settings["top_k"])

    @property
    def target_types(self) -> tuple[str, ...]:
        """Which target columns the shards hold; caches from before sampled targets hold top-k only."""
        return tuple(self.columns.get("targets", ["topk"]))

    @property
    def default_targets(self) -> str:
        """The target type a student trains on unless told otherwise: the one the cache was dumped for."""
        return "topk" if "topk" in self.target_types else self.target_types[0]

    @property
    def trainable_targets(self) -> tuple[str, ...]:
        """The target types a student can train on: those stored, and topk from a head-tail cache (its head and
        exact tail mass are top-k targets)."""
        return self.target_types + (("topk",) if "head-tail" in self.target_types else ())

    @property
    def codec(self) -> Codec:
        return Codec.from_manifest(self.columns, self.settings)

    @property
    def draws(self) -> int | None:
        """Draws per position of the sampled columns, if the cache holds any."""
        return int(self.settings["samples"]) if "sampled" in column_groups(self.target_types) else None

    @property
    def hidden_layers(self) -> list[int]:
        return [int(layer) for layer in self.columns.get("hidden_sizes", {})]

    @property
    def hidden_sizes(self) -> dict[int, int]:
        return {int(layer): int(size) for layer, size in self.columns.get("hidden_sizes", {}).items()}

    @property
    def shard_fingerprints(self) -> set[str]:
        """Dump fingerprints a shard's schema metadata may carry: this cache's, or (merged caches keep
        their sources' shards as they are) that of the dump a source shard came from."""
        return {self.dump_fingerprint, *(fingerprint for source in self.sources
                                         for fingerprint in source.get("shard_fingerprints", []))}

    @property
    def data_fingerprint(self) -> str:
        """sha256 over every shard's name and sha256: what a reader of the shards gets, so tools that cache
        what they read (`datasets.load_dataset(<cache dir>)`, through the card) key it by this."""
        return sha256_json([[shard.file, shard.sha256] for shard in self.shards])

    @property
    def total_rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names, this cache's own first; empty for a cache of one teacher."""
        return [entry["name"] for entry in self.teachers]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.teachers:  # a cache of one teacher keeps the manifest it always had
            del data["teachers"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["shards"] = [ShardInfo(**shard) for shard in data.get("shards", [])]
        return cls(**values)

    def save(self, cache_dir: Path) -> None:
        """Write the manifest atomically: readers see the old file or the new one, never half."""
        write_json_atomic(Path(cache_dir) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def load(cls, cache_dir: Path) -> Manifest:
        """The manifest of a local cache: a regular file inside it (a symlink is refused like a shard's), read
        up to `MAX_MANIFEST_BYTES`."""
        from .safety import MAX_MANIFEST_BYTES, contained_file, read_capped
        if not Path(cache_dir).is_dir():
            raise KDCacheError(f"cache directory not found: {cache_dir}")
        path = contained_file(Path(cache_dir), MANIFEST_NAME)
        if path is None:
            raise KDCacheError(f"not a kdcache cache (no {MANIFEST_NAME}): {cache_dir}")
        try:
            with open(path, "rb") as handle:
                text = read_capped(handle, MAX_MANIFEST_BYTES, str(path))
        except OSError as error:
            raise KDCacheError(f"cannot read manifest {path}: {error.strerror or error}") from None
        return cls.from_json(text, str(path))

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse manifest text read from `source` (a path or URL, named in errors), checking every field
        (kdcache/cache/safety.py) before any is used: a received manifest is untrusted."""
        from .safety import check_manifest, printable
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # RecursionError: arrays nested thousands deep
            reason = "nested too deeply" if isinstance(error, RecursionError) else error
            raise KDCacheError(f"unreadable manifest {printable(source)}: {reason}") from None
        check_manifest(data, printable(source))
        return cls.from_dict(data)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, then rename it over `path`: readers see the old
    file or the new one, never half of one."""
    temporary = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON, written atomically (`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
