"""`kdcache export` / `kdcache import`: the offline-KD dataset formats of axolotl and DistillKit.

Teams already train with these tools; a cache should feed them, and their datasets should become
caches. Both formats are `datasets` datasets of pre-tokenized rows holding one top-k list per token
position, with kdcache's alignment (position t: the teacher's distribution of the token after t).
What each format holds, as read in the tools' own code:

DistillKit (arcee-ai/DistillKit, `distillkit/compression/compressor.py` `decompress_to_sparse`,
`signals.py` `OfflineSignalSource`, `compression/densify.py`, `pack_logits.py`):
  `input_ids`, `token_ids` [T][k], `top_values` [T][k]: log-probabilities (`log_values=True`),
  normalised over the whole vocabulary (its SYMMETRIC_UNIFORM missing-mass handling computes the
  tail as 1 − Σ exp(top_values)), at the capture temperature (`preapplied_temperature`, 1.0).
  Its vLLM capture has no distribution for the last token (T = L − 1) and its trainer cuts
  `input_ids` to T. Its own captures are usually *compressed* (`compressed_logprobs` +
  `bytepacked_indices`, or legacy `packed_indices`/`exact_values`/`coeffs`), which only DistillKit's
  compressor with the capture's config decodes; the raw `token_ids`/`top_values` rows are the
  form its loader accepts without that config, so that is what kdcache writes and reads.
  Export: top-k ids and float32 log-probs, sorted descending, at every position (T = L). Lost: the
  exact tail (DistillKit recomputes it from the top-k, to float precision), the sample ids, hidden
  states and sampled targets. Import: the tail is recomputed as log(1 − Σ exp(top_values)) — exact
  only to the float precision of the source — and is −inf when the source was renormalised; rows
  are re-sorted descending; `input_ids` is cut to T as DistillKit does.

axolotl (axolotl-ai-cloud/axolotl, `src/axolotl/integrations/kd/chat_template.py`
`ChatTemplateStrategyWithKDv2.transform_logprobs`, `collator.py`, `topk_logprob/forward_kl.py`):
  its KD trainer consumes rows of `input_ids`, `attention_mask`, `labels`, `target_token_ids`
  [L][k], `target_logprobs` [L][k] and `target_mask` [L][k]. Its chat-template strategy builds
  them from chat `messages` + raw top-k log-probs by *renormalising the top-k* (and raising it to
  the power T_gen / T_kd); the loss expects them "already re-normalized". kdcache exports these
  tokenized rows (a cache holds tokens, not chat messages), at temperature 1, to be loaded as a
  pre-tokenized dataset (`type:` empty) with the KD plugin. Lost: the tail mass (renormalised), the
  sample ids, hidden and sampled targets. Import: the tail is unknown (−inf: as if the top-k held all
  the mass, which is exactly what axolotl's loss assumes); positions axolotl padded (no target,
  log-probs −inf) cannot be represented, so such rows are skipped and their ids listed in
  `stats.skipped_sample_ids`; the temperature axolotl applied while building the rows is not
  recorded in them, so it is assumed to be 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import __version__
from .cache.card import write_card
from .cache.combine import derived_stats
from .cache.format import TOKENIZER_DIR, Manifest, sha256_json, shard_schema, token_id_type, tokenizer_fingerprint
from .cache.cache import Cache
from .cache.store import CacheStore
from .cache.writer import CachedSequence, ShardWriter
from .errors import KDCacheError


@dataclasses.dataclass(frozen=True)
class Format:
    ids: str
    logprobs: str
    renormalised: bool  # the format's log-probs are renormalised over the top-k (the tail is lost)
    extra: tuple[str, ...] = ()  # more columns the tool needs, derived from the tokens


FORMATS = {
    "distillkit": Format(ids="token_ids", logprobs="top_values", renormalised=False),
    "axolotl": Format(ids="target_token_ids", logprobs="target_logprobs", renormalised=True,
                      extra=("attention_mask", "labels", "target_mask")),
}
ROWS_PER_BATCH = 256


def _format(name: str) -> Format:
    if name not in FORMATS:
        raise KDCacheError(f"`format` must be one of {', '.join(FORMATS)}, got {name!r}")
    return FORMATS[name]


def _new_directory(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KDCacheError(f"`out` {out} exists and is not empty")


def _export_batch(rows: list[CachedSequence], fmt: Format) -> pa.Table:
    lengths = np.array([len(row.input_ids) for row in rows])
    k = rows[0].topk_ids.shape[1]
    ids = np.concatenate([row.topk_ids for row in rows]).astype(np.int32)
    logprobs = np.concatenate([row.topk_logprobs for row in rows]).astype(np.float32)
    if fmt.renormalised:
        peak = logprobs[:, :1]
        logprobs = logprobs - (peak + np.log(np.exp(logprobs - peak).sum(axis=1, keepdims=True)))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def per_position(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.ListArray.from_arrays(
            pa.array(np.arange(0, values.size + 1, k, dtype=np.int32)), pa.array(values.reshape(-1))))

    tokens = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate([row.input_ids for row in rows])))
    columns = {"input_ids": tokens, fmt.ids: per_position(ids), fmt.logprobs: per_position(logprobs)}
    if fmt.extra:
        columns |= {"attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(lengths.sum(), np.int8))),
                    "labels": tokens, "target_mask": per_position(np.ones(ids.shape, np.int8))}
    return pa.table(columns)


def export_cache(cache: str | Path, out: Path | str, fmt: str) -> int:
    """Write the cache's top-k targets as a `datasets.save_to_disk` directory in format `fmt`; return the rows."""
    import datasets

    spec, out = _format(fmt), Path(out)
    store = CacheStore(cache)
    manifest = store.load_manifest()
    if manifest.task != "causal-lm" or "topk" not in manifest.target_types:
        raise KDCacheError(f"{fmt} reads top-k targets of causal LMs; {cache} holds {manifest.task} "
                           f"{'/'.join(manifest.target_types)} targets")
    _new_directory(out)
    with tempfile.TemporaryDirectory(prefix="kdcache-export-") as scratch:
        path = Path(scratch) / "rows.arrow"
        writer, rows, count = None, [], 0
        for sequence in Cache(store, manifest).sequences():
            rows.append(sequence)
            if len(rows) == ROWS_PER_BATCH:
                writer, count = _write_rows(writer, path, _export_batch(rows, spec), count)
                rows = []
        if rows:
            writer, count = _write_rows(writer, path, _export_batch(rows, spec), count)
        writer.close()
        try:
            datasets.Dataset.from_file(str(path)).save_to_disk(str(out))
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
    return count


def _write_rows(writer, path: Path, table: pa.Table, count: int):
    writer = writer or pa.ipc.new_stream(str(path), table.schema)
    writer.write_table(table)
    return writer, count + table.num_rows


def _imported_rows(table: pa.Table, first_id: int, spec: Format, vocab_size: int, fmt: str):
    """(sample id, CachedSequence or None when the row cannot be represented) for each row of `table`."""
    for index, row in enumerate(table.to_pylist()):
        sample_id = first_id + index
        shape_error = KDCacheError(f"row {sample_id}: `{spec.ids}` and `{spec.logprobs}` must be [positions][k] "
                                   f"lists of the same shape, and `input_ids` a list of token ids")
        try:  # a ragged or mistyped row of someone else's dataset: one line, not numpy's traceback
            ids = np.asarray(row[spec.ids], dtype=np.int64)
            logprobs = np.asarray(row[spec.logprobs], dtype=np.float32)
            tokens = np.asarray(row["input_ids"], dtype=np.int32)
        except (ValueError, TypeError, OverflowError):
            raise shape_error from None
        if ids.ndim != 2 or ids.shape != logprobs.shape or not len(ids) or tokens.ndim != 1:
            raise shape_error
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise KDCacheError(f"row {sample_id}: token id {int(ids.max())} is outside the tokenizer's "
                               f"{vocab_size} tokens")
        if len(ids) > len(tokens):
            raise KDCacheError(f"row {sample_id}: {len(ids)} target positions for {len(tokens)} tokens")
        if not np.isfinite(logprobs).all() or (fmt == "axolotl" and len(ids) != len(tokens)):
            yield sample_id, None  # padded (axolotl) or damaged positions: no target to store
            continue
        order = np.argsort(-logprobs, axis=1, kind="stable")
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
        tail = (np.full(len(ids), -np.inf) if spec.renormalised
                else np.where(mass < 1 - 1e-6, np.log1p(-np.minimum(mass, 1.0)), -np.inf))
        yield sample_id, CachedSequence(sample_id=sample_id, input_ids=tokens[:len(ids)],
                                        topk_ids=np.take_along_axis(ids, order, axis=1),
                                        topk_logprobs=logprobs, tail_logprob=tail.astype(np.float32))


def import_dataset(source: str, out: Path | str, fmt: str, *, tokenizer: str, teacher: str | None = None,
                   split: str = "train", shard_rows: int = 10_000) -> Manifest:
    """Make a kdcache cache in `out` from a dataset in format `fmt` whose ids are `tokenizer`'s tokens."""
    from .models import load_tokenizer
    from .teacher.data import describe, load_rows

    spec, out = _format(fmt), Path(out)
    rows = load_rows(source, split)
    dataset = describe(rows, str(source), split, "input_ids")
    missing = [name for name in ("input_ids", spec.ids, spec.logprobs) if name not in rows.column_names]
    if missing:
        raise KDCacheError(_missing_columns_message(fmt, source, missing, rows.column_names))
    loaded_tokenizer = load_tokenizer(tokenizer, "`tokenizer`")
    vocab_size = len(loaded_tokenizer)
    first = rows[0][spec.ids] if len(rows) else None
    k = len(first[0]) if isinstance(first, list) and first and isinstance(first[0], list) else 0
    if not k:
        raise KDCacheError(f"`{spec.ids}` of the first row of {source} is not a [positions][k] list of ids")
    tokenizer_info = tokenizer_fingerprint(loaded_tokenizer)
    fingerprint = sha256_json({"import": fmt, "dataset": dataset["fingerprint"], "tokenizer": tokenizer_info["hash"]})
    _new_directory(out)
    try:
        schema = shard_schema(top_k=k, vocab_size=vocab_size, logprob_dtype="float32", hidden_sizes={},
                              dump_fingerprint=fingerprint)
        skipped = []
        with ShardWriter(out, schema, shard_rows=shard_rows) as writer:
            for start in range(0, len(rows), ROWS_PER_BATCH):
                table = rows.select_columns(["input_ids", spec.ids, spec.logprobs]).with_format("arrow")[
                    start:start + ROWS_PER_BATCH]
                batch = []
                for sample_id, sequence in _imported_rows(table, start, spec, vocab_size, fmt):
                    if sequence is None:
                        skipped.append(sample_id)
                    elif sequence.topk_ids.shape[1] != k:
                        raise KDCacheError(f"row {sample_id} has top-{sequence.topk_ids.shape[1]} targets, "
                                           f"row 0 top-{k}: a cache holds one k")
                    else:
                        batch.append(sequence)
                writer.write(batch)
            shards = writer.close()
        if not shards:
            raise KDCacheError(f"no row of {source} holds a target at every position")
        loaded_tokenizer.save_pretrained(out / TOKENIZER_DIR)
        manifest = Manifest(
            task="causal-lm",
            teacher={"name_or_path": teacher or f"unknown (imported from {fmt})", "model_type": None,
                     "num_parameters": None, "weights_sha256": None, "config_sha256": None},
            tokenizer={**tokenizer_info, "model_vocab_size": vocab_size},
            dataset={**dataset, "rows_dumped": sum(shard.rows for shard in shards), "imported_from": fmt},
            settings={"top_k": k, "logprob_dtype": "float32", "targets": "topk", "shard_rows": shard_rows,
                      "hidden_layers": [], "temperature": 1.0, "tail": "unknown: renormalised top-k"
                      if spec.renormalised else "recomputed as 1 - sum(top-k p)"},
            columns={"targets": ["topk"], "topk_ids": str(token_id_type(vocab_size)), "topk_logprobs": "float32",
                     "hidden_sizes": {}, "hidden_columns": []},
            dump_fingerprint=fingerprint, shards=shards, kdcache_version=__version__,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        manifest.stats = derived_stats(out, manifest, shards, {}, skipped)
        write_card(out, manifest)
        manifest.save(out)
        return manifest
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _missing_columns_message(fmt: str, source: str, missing: list[str], present: list[str]) -> str:
    compressed = {"compressed_logprobs", "bytepacked_indices", "packed_indices"} & set(present)
    if fmt == "distillkit" and compressed:
        return (f"{source} holds DistillKit's compressed targets ({', '.join(sorted(compressed))}), which only its "
                f"compressor and the capture's config decode: decode them to token_ids/top_values with DistillKit "
                f"(LogprobCompressor.decompress_to_sparse) first")
    if fmt == "axolotl" and "messages" in present:
        return (f"{source} holds chat messages, which axolotl tokenizes with its chat template: import the "
                f"tokenized rows (input_ids, target_token_ids, target_logprobs) axolotl builds from them")
    return f"{source} lacks the {fmt} column(s) {', '.join(missing)} (it has {', '.join(present)})"
