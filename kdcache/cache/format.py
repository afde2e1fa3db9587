"""The cache contract: directory layout, Arrow schema, manifest and fingerprints.

Everything another team relies on when it receives a cache lives here, so the contract can be
read in one file (the README restates it for humans). A cache is complete exactly when
`kdcache.json` exists: the dump writes it last, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import KDCacheError

FORMAT_VERSION = 1
TARGET_TYPES = ("topk", "sampled")
MAX_SAMPLES = 2**16 - 1  # sampled counts are uint16
MANIFEST_NAME = "kdcache.json"
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
SHARD_SUFFIX = ".arrow"
PARTIAL_SUFFIX = ".partial"


def token_id_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type holding every id: uint16 halves the id bytes of most vocabularies."""
    return pa.uint16() if vocab_size <= 2**16 else pa.uint32()


def hidden_column(layer: int) -> str:
    """Column name of hidden layer `layer` (non-negative, Hugging Face `hidden_states` index)."""
    return f"hidden_{layer}"


# Columns only some tasks write (see kdcache/tasks.py), in schema order, after the target columns.
# `target_positions`: which token each target belongs to (absent = every position, the causal-LM case);
# `labels`: the gold class of each target; `token_type_ids`: segment ids of text pairs;
# `position_ids`: causal-LM rows packing several documents, positions restarting at 0 at each
# document's first token (a document sees only itself: see kdcache/tasks/base.py, "Packed documents").
OPTIONAL_COLUMNS = {"token_type_ids": pa.list_(pa.int8()), "target_positions": pa.list_(pa.int32()),
                    "labels": pa.list_(pa.int32()), "position_ids": pa.list_(pa.int32())}


POOLED_COLUMN = "pooled"


def shard_schema(*, top_k: int, vocab_size: int, logprob_dtype: str, hidden_sizes: dict[int, int],
                 dump_fingerprint: str, target_types: tuple[str, ...] = ("topk",),
                 optional_columns: tuple[str, ...] = (), pooled_size: int | None = None) -> pa.Schema:
    """The Arrow schema of every shard of one cache.

    `vocab_size` is the number of classes the targets range over (the tokenizer's vocabulary for
    a causal LM, the label set for classification); it picks the id type. The dump fingerprint is also stored in each shard's schema metadata, so a shard that strays
    into another cache directory can be recognised (Megatron's logits saver does the same).
    Sampled targets have a variable number of distinct ids per position, hence list<list<...>>.
    """
    logprob_type = {"float16": pa.float16(), "float32": pa.float32()}[logprob_dtype]
    id_type = token_id_type(vocab_size)
    fields = [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
    if "topk" in target_types:
        fields += [
            pa.field("topk_ids", pa.list_(pa.list_(id_type, top_k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(logprob_type, top_k)), nullable=False),
            pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False),
        ]
    if "sampled" in target_types:
        fields += [
            pa.field("sampled_ids", pa.list_(pa.list_(id_type)), nullable=False),
            pa.field("sampled_counts", pa.list_(pa.list_(pa.uint16())), nullable=False),
        ]
    fields += [pa.field(name, column_type, nullable=False) for name, column_type in OPTIONAL_COLUMNS.items()
               if name in optional_columns]
    fields += [pa.field(hidden_column(layer), pa.list_(pa.list_(pa.float16(), size)), nullable=False)
               for layer, size in sorted(hidden_sizes.items())]
    if pooled_size is not None:  # an encoder's pooled output: one [d] vector per row
        fields.append(pa.field(POOLED_COLUMN, pa.list_(pa.list_(pa.float16(), pooled_size)), nullable=False))
    metadata = {"kdcache.format_version": str(FORMAT_VERSION), "kdcache.dump_fingerprint": dump_fingerprint}
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


@dataclasses.dataclass
class ShardInfo:
    file: str  # relative to the cache directory, e.g. "data/shard-00000-00000.arrow"
    rows: int
    tokens: int
    bytes: int
    sha256: str


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
    def hidden_layers(self) -> list[int]:
        return [int(layer) for layer in self.columns.get("hidden_sizes", {})]

    @property
    def hidden_sizes(self) -> dict[int, int]:
        return {int(layer): int(size) for layer, size in self.columns.get("hidden_sizes", {}).items()}

    @property
    def total_rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        path = Path(cache_dir) / MANIFEST_NAME
        if not Path(cache_dir).is_dir():
            raise KDCacheError(f"cache directory not found: {cache_dir}")
        if not path.is_file():
            raise KDCacheError(f"not a kdcache cache (no {MANIFEST_NAME}): {cache_dir}")
        return cls.from_json(path.read_text(), str(path))

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        """Parse manifest text read from `source` (a path or URL, named in errors) and check its version."""
        try:
            manifest = cls.from_dict(json.loads(text))
        except (ValueError, TypeError) as error:
            raise KDCacheError(f"unreadable manifest {source}: {error}") from None
        if manifest.format_version > FORMAT_VERSION:
            raise KDCacheError(f"cache format version {manifest.format_version} is newer than this "
                               f"kdcache supports ({FORMAT_VERSION}); upgrade kdcache")
        return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling, fsync it, then rename it over `path`."""
    temporary = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
