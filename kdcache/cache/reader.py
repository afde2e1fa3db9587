"""Reading a cache: integrity checks and a memory-mapped stream of sequences.

Shards are opened with `pyarrow.memory_map`, so reading a row touches only that row's pages and
the resident memory does not grow with the cache. Integrity is checked against the manifest
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
from .format import Manifest, ShardInfo, sha256_file, shard_schema
from .writer import CachedSequence, Ragged


def expected_schema(manifest: Manifest) -> pa.Schema:
    settings = manifest.settings
    return shard_schema(top_k=manifest.top_k, vocab_size=manifest.vocab_size,
                        logprob_dtype=settings["logprob_dtype"], hidden_sizes=manifest.hidden_sizes,
                        dump_fingerprint=manifest.dump_fingerprint, target_types=manifest.target_types)


def _open_shard(path: Path) -> pa.RecordBatchFileReader:
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (OSError, pa.ArrowInvalid) as error:
        raise KDCacheError(f"cannot read shard {path}: {error}") from None


def check_shard_files(cache_dir: Path, manifest: Manifest) -> None:
    """The cheap check: every shard the manifest lists exists with the recorded size."""
    if not manifest.shards:
        raise KDCacheError(f"cache {cache_dir} has no shards")
    for shard in manifest.shards:
        path = Path(cache_dir) / shard.file
        if not path.is_file():
            raise KDCacheError(f"shard {shard.file} is missing from cache {cache_dir}")
        if path.stat().st_size != shard.bytes:
            raise KDCacheError(f"shard {shard.file} has {path.stat().st_size} bytes, "
                               f"the manifest says {shard.bytes}: the shard was modified or truncated")


def _verify_shard(cache_dir: Path, shard: ShardInfo, schema: pa.Schema) -> None:
    path = Path(cache_dir) / shard.file
    if sha256_file(path) != shard.sha256:
        raise KDCacheError(f"shard {shard.file} fails its sha256 check: the file was modified or corrupted")
    reader = _open_shard(path)
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


def verify_cache(cache_dir: Path, manifest: Manifest, *, progress: bool = True) -> None:
    """Re-hash every shard and check its schema and counts; raise naming the first bad shard."""
    check_shard_files(cache_dir, manifest)
    schema = expected_schema(manifest)
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        _verify_shard(cache_dir, shard, schema)


def content_sha256(cache_dir: Path, shards: list[ShardInfo]) -> str:
    """sha256 over every row's sample id (int64) and tokens (int32), in shard order.

    Identifies what text a cache covers independently of the targets, so two caches of the same
    data compare equal whatever teacher, settings or number of processes made them.
    """
    digest = hashlib.sha256()
    for shard in shards:
        reader = _open_shard(Path(cache_dir) / shard.file)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index)
            tokens = batch.column("input_ids")
            offsets = tokens.offsets.to_numpy()
            offsets = offsets - offsets[0]
            values = tokens.flatten().to_numpy()
            for row, sample_id in enumerate(batch.column("sample_id").to_numpy()):
                digest.update(np.int64(sample_id).tobytes() + values[offsets[row]:offsets[row + 1]].tobytes())
    return digest.hexdigest()


def _batch_sequences(batch: pa.RecordBatch, hidden_layers: list[int]) -> Iterator[CachedSequence]:
    """Decode a record batch into per-row numpy views (no copies of the value buffers)."""
    def per_token(name: str) -> tuple[np.ndarray, np.ndarray]:
        column = batch.column(name)
        offsets = column.offsets.to_numpy()
        values = column.flatten()
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
            values = values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            values = values.to_numpy(zero_copy_only=False)
        return offsets - offsets[0], values

    def per_position(name: str) -> Ragged:
        """A list<list<...>> column as one Ragged over every position of the batch."""
        positions = batch.column(name).flatten()
        offsets = positions.offsets.to_numpy()
        return Ragged(values=positions.flatten().to_numpy(zero_copy_only=False), offsets=offsets - offsets[0])

    names = set(batch.schema.names)
    offsets, input_ids = per_token("input_ids")
    columns = {name: per_token(name)[1] for name in ("topk_ids", "topk_logprobs", "tail_logprob") if name in names}
    ragged = {name: per_position(name) for name in ("sampled_ids", "sampled_counts") if name in names}
    hidden = {layer: per_token(f"hidden_{layer}")[1] for layer in hidden_layers}
    sample_ids = batch.column("sample_id").to_numpy()
    for row, sample_id in enumerate(sample_ids):
        span = slice(offsets[row], offsets[row + 1])
        yield CachedSequence(sample_id=int(sample_id), input_ids=input_ids[span],
                             **{name: values[span] for name, values in columns.items()},
                             **{name: values.positions(span) for name, values in ragged.items()},
                             hidden={layer: values[span] for layer, values in hidden.items()})


def read_sample_ids(cache_dir: Path, manifest: Manifest) -> np.ndarray:
    """Every sample id in the cache, in shard order; reads only the `sample_id` column."""
    ids = [_open_shard(Path(cache_dir) / shard.file).read_all().column("sample_id").to_numpy()
           for shard in manifest.shards]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def iter_sequences(cache_dir: Path, manifest: Manifest, *, hidden_layers: list[int] | None = None,
                   shuffle: bool = False, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1024,
                   process_index: int = 0, num_processes: int = 1,
                   sample_ids: frozenset[int] | None = None) -> Iterator[CachedSequence]:
    """Stream the cache's sequences, optionally shuffled (shard order + bounded buffer).

    With several processes each takes every `num_processes`-th row of the (shuffled) shard
    order and all take the same number, so no process waits at a step the others never reach.
    `hidden_layers` limits which hidden columns are decoded (default: none). `sample_ids`, if
    given, keeps only those rows (a train/validation split), before rows are dealt to processes.
    """
    shards = list(manifest.shards)
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(shards)
    per_process = (manifest.total_rows if sample_ids is None else len(sample_ids)) // num_processes
    layers = hidden_layers or []

    def owned_rows() -> Iterator[CachedSequence]:
        global_index = taken = 0
        for shard in shards:
            reader = _open_shard(Path(cache_dir) / shard.file)
            for batch_index in range(reader.num_record_batches):
                for sequence in _batch_sequences(reader.get_batch(batch_index), layers):
                    if sample_ids is not None and sequence.sample_id not in sample_ids:
                        continue
                    if global_index % num_processes == process_index:
                        if taken == per_process:
                            return
                        taken += 1
                        yield sequence
                    global_index += 1

    if not shuffle:
        yield from owned_rows()
        return
    buffer: list[CachedSequence] = []
    for sequence in owned_rows():
        if len(buffer) < shuffle_buffer:
            buffer.append(sequence)
            continue
        slot = rng.randrange(len(buffer))
        buffer[slot], sequence = sequence, buffer[slot]
        yield sequence
    rng.shuffle(buffer)
    yield from buffer
