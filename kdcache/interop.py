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
  compressor with the capture's config decodes; it also reads raw `token_ids`/`top_values` rows (its
  config still needs a `logprob_compressor` block, of which only `d` is then read), so that is what
  kdcache writes and reads. Its trainer masks positions whose `labels` are < 0 and trains only rows
  packed by its `pack_logits` (docs/sharing.md gives a config that ran).
  Export: top-k ids and float32 log-probs, sorted descending whatever the codec, at every position
  (T = L), the head scaled so that Σp = 1 − exact tail (see TAIL_FLOOR). Lost: the tail below the floor,
  the sample ids, hidden states and draws. Import: the tail is recomputed as log(1 − Σ exp(top_values)) —
  exact only to the float precision of the source — and is −inf when the source was renormalised; rows
  are re-sorted descending; `input_ids` is cut to T as DistillKit does; positions whose labels are −100
  become untrained positions (`target_positions`).

axolotl (axolotl-ai-cloud/axolotl, `src/axolotl/integrations/kd/chat_template.py`
`ChatTemplateStrategyWithKDv2.transform_logprobs`, `collator.py`, `topk_logprob/forward_kl.py`):
  its KD trainer consumes rows of `input_ids`, `attention_mask`, `labels`, `target_token_ids`
  [L][k], `target_logprobs` [L][k] and `target_mask` [L][k]. Its chat-template strategy builds
  them from chat `messages` + raw top-k log-probs by *renormalising the top-k* (and raising it to
  the power T_gen / T_kd); the loss expects them "already re-normalized". kdcache exports these
  tokenized rows (a cache holds tokens, not chat messages), tempered at `kd_temperature` (its trainer
  divides only the student's logits by it), to be loaded as a pre-tokenized dataset (`type:` empty)
  with the KD plugin. Lost: the tail mass (renormalised), the sample ids, hidden states and draws.
  Import: the tail is unknown (−inf: as if the top-k held all the mass, which is exactly what axolotl's
  loss assumes); positions its `target_mask`/`labels` leave out become untrained positions
  (`target_positions`: no KD or CE term), and come back masked on export; rows cut short (fewer
  target positions than tokens) are skipped and their ids listed in `stats.skipped_sample_ids`; the
  temperature axolotl applied while building the rows is not recorded in them, so it is assumed to be 1.
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


# DistillKit's `symmetric_uniform` missing-mass term takes log1p(−Σp) over the float32 sum of the exported
# probabilities (clamped to 1 − 1e-8, which is 1.0 in float32): a position whose head sums to 1 after rounding
# trains NaN. The exported head therefore sums to 1 − tail with the tail floored at 2^-16, far above the
# rounding of k float32 terms (k · 6e-8), and costs at most ~2^-16 nats of KL where the exact tail is smaller.
TAIL_FLOOR = 2.0 ** -16


def _ragged(cache: str | Path) -> KDCacheError:
    return KDCacheError(f"{cache} lists fewer ids at some positions than at others (top-p or ragged top-k "
                        f"targets); axolotl and DistillKit read a fixed k per position: export a cache dumped "
                        f"with `top_k` and no `top_p`")


def _sorted_head(row: CachedSequence, cache: str | Path, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's top-k ids and float64 log-probs in descending probability whatever the codec, and its
    float64 tail log-mass; empty slots (ragged rows) are refused: both tools read a fixed k."""
    logprobs = row.topk_logprobs.astype(np.float64)
    if logprobs.shape[1] != k or not np.isfinite(logprobs).all():
        raise _ragged(cache)
    order = np.argsort(-logprobs, axis=1, kind="stable")
    return (np.take_along_axis(row.topk_ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1),
            row.tail_logprob.astype(np.float64))


def exported_logprobs(logprobs: np.ndarray, tail_logprob: np.ndarray, fmt: Format, kd_temperature: float) -> np.ndarray:
    """The float32 log-probs `fmt` gets for sorted head log-probs [P, k] with exact tail log-masses [P].

    DistillKit: the head scaled to sum to 1 − tail (tail floored at TAIL_FLOOR), so its `symmetric_uniform`
    handling recovers the tail and never sees a sum ≥ 1. axolotl: the head renormalised and tempered at
    `kd_temperature` (p^(1/T) renormalised, as its chat-template strategy builds rows), since its trainer
    divides only the student's logits by `kd_temperature` and takes the targets as they are.
    """
    head = logprobs - (logprobs[:, :1] + np.log(np.exp(logprobs - logprobs[:, :1]).sum(axis=1, keepdims=True)))
    if fmt.renormalised:
        tempered = head / kd_temperature
        return (tempered - (tempered[:, :1] + np.log(np.exp(tempered - tempered[:, :1]).sum(axis=1, keepdims=True)))
                ).astype(np.float32)
    mass = np.minimum(-np.expm1(np.minimum(tail_logprob, 0.0)), 1 - TAIL_FLOOR)
    return (head + np.log(mass)[:, None]).astype(np.float32)


def _full_length(row: CachedSequence, cache: str | Path, k: int):
    """`_sorted_head` at every token position, and which positions are trained: a cache imported with
    untrained positions (`target_positions`) gets a placeholder head there (k ids of mass 1/2k each), which
    the tools skip by their masks (axolotl's target_mask, DistillKit's labels < 0) but keep finite."""
    ids, logprobs, tail = _sorted_head(row, cache, k)
    if row.target_positions is None:
        return ids, logprobs, tail, np.ones(len(row.input_ids), dtype=bool)
    length = len(row.input_ids)
    trained = np.zeros(length, dtype=bool)
    trained[row.target_positions] = True
    full_ids, full_logprobs = np.tile(np.arange(k), (length, 1)), np.full((length, k), np.log(0.5 / k))
    full_tail = np.full(length, np.log(0.5))
    full_ids[trained], full_logprobs[trained], full_tail[trained] = ids, logprobs, tail
    return full_ids, full_logprobs, full_tail, trained


def _export_batch(rows: list[CachedSequence], fmt: Format, cache: str | Path, kd_temperature: float,
                  masked: bool) -> pa.Table:
    lengths = np.array([len(row.input_ids) for row in rows])
    k = rows[0].topk_ids.shape[1]
    heads = [_full_length(row, cache, k) for row in rows]
    ids = np.concatenate([head[0] for head in heads]).astype(np.int32)
    logprobs = exported_logprobs(np.concatenate([head[1] for head in heads]),
                                 np.concatenate([head[2] for head in heads]), fmt, kd_temperature)
    trained = np.concatenate([head[3] for head in heads])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def per_token(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, values if isinstance(values, pa.Array) else pa.array(values))

    def per_position(values: np.ndarray) -> pa.Array:
        return per_token(pa.ListArray.from_arrays(pa.array(np.arange(0, values.size + 1, k, dtype=np.int32)),
                                                  pa.array(values.reshape(-1))))

    tokens = np.concatenate([row.input_ids for row in rows])
    columns = {"input_ids": per_token(tokens), fmt.ids: per_position(ids), fmt.logprobs: per_position(logprobs)}
    if fmt.extra or masked:  # labels: -100 where the source trained nothing, as both tools mask
        columns["labels"] = per_token(np.where(trained, tokens, -100).astype(np.int32))
    if fmt.extra:
        columns |= {"attention_mask": per_token(np.ones(lengths.sum(), np.int8)),
                    "target_mask": per_position(np.repeat(trained[:, None], k, axis=1).astype(np.int8))}
    return pa.table(columns)


def export_cache(cache: str | Path, out: Path | str, fmt: str, *, kd_temperature: float = 1.0) -> int:
    """Write the cache's top-k targets as a `datasets.save_to_disk` directory in format `fmt`; return the rows.

    Top-k caches export their top-k; head-tail caches (dump-teacher's default) their exact head and tail
    mass, without the draws (neither tool reads a variable number of ids per position). `kd_temperature`
    (axolotl only) must equal the `kd_temperature` of the axolotl config that trains on the rows.
    """
    import datasets

    spec, out = _format(fmt), Path(out)
    if not (np.isfinite(kd_temperature) and kd_temperature > 0):
        raise KDCacheError(f"`kd_temperature` must be a positive number, got {kd_temperature}")
    if kd_temperature != 1 and not spec.renormalised:
        raise KDCacheError(f"`kd_temperature` applies to axolotl exports only: DistillKit tempers the targets "
                           f"itself (its loss's `temperature`)")
    store = CacheStore(cache)
    manifest = store.load_manifest()
    if manifest.task != "causal-lm" or "topk" not in manifest.trainable_targets:
        raise KDCacheError(f"{fmt} reads top-k targets of causal LMs; {cache} holds {manifest.task} "
                           f"{'/'.join(manifest.target_types)} targets (dump with `targets` topk or head-tail)")
    if manifest.settings.get("top_p") is not None:  # how many ids a position lists depends on the teacher
        raise _ragged(cache)
    masked = "target_positions" in manifest.optional_columns
    _new_directory(out)
    with tempfile.TemporaryDirectory(prefix="kdcache-export-") as scratch:
        path = Path(scratch) / "rows.arrow"
        writer, rows, count = None, [], 0
        for sequence in Cache(store, manifest).sequences():
            rows.append(sequence)
            if len(rows) == ROWS_PER_BATCH:
                table = _export_batch(rows, spec, cache, kd_temperature, masked)
                writer, count, rows = *_write_rows(writer, path, table, count), []
        if rows:
            writer, count = _write_rows(writer, path, _export_batch(rows, spec, cache, kd_temperature, masked), count)
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


MASK_COLUMNS = ("target_mask", "labels")  # which positions the source trains on (axolotl; DistillKit reads labels)


def _trained(row: dict, positions: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Which target positions the source trains on [T] and which slots hold a target [T, k]: both tools skip
    position t where labels[t] is -100 (DistillKit masks labels < 0, axolotl builds target_mask[t] from
    labels[t]), and axolotl reads only the slots its target_mask marks."""
    slots = np.ones((positions, k), dtype=bool)
    if row.get("target_mask") is not None:
        mask = _array(row["target_mask"], "target_mask")
        if mask.ndim != 2 or mask.shape[0] < positions or mask.shape[1:] != (k,):
            raise KDCacheError(f"`target_mask` must be a [positions][{k}] list like the targets, got {mask.shape}")
        slots = mask[:positions] != 0
    trained = slots.any(axis=1)
    if row.get("labels") is not None:
        labels = _array(row["labels"], "labels")
        if labels.ndim != 1:
            raise KDCacheError(f"`labels` must be a list of token ids, got shape {labels.shape}")
        trained &= np.concatenate([labels[:positions], np.zeros(max(0, positions - len(labels)))]) >= 0
    return trained, slots


def _array(values, column: str) -> np.ndarray:
    """A mask column of someone else's dataset as integers: one line, not numpy's traceback, when it is ragged
    or holds something else."""
    try:
        return np.asarray(values, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise KDCacheError(f"`{column}` must be a list of integers (one per position)") from None


def _imported_rows(table: pa.Table, first_id: int, spec: Format, vocab_size: int, fmt: str, masked: bool):
    """(sample id, CachedSequence or None when the row cannot be represented) for each row of `table`;
    `masked`: the source says which positions it trains on, kept as the rows' `target_positions`."""
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
        if len(ids) > len(tokens):
            raise KDCacheError(f"row {sample_id}: {len(ids)} target positions for {len(tokens)} tokens")
        trained, slots = _trained(row, len(ids), ids.shape[1])
        ids, logprobs, slots = ids[trained], logprobs[trained], slots[trained]
        if ids.size and (ids[slots].min() < 0 or ids[slots].max() >= vocab_size):
            raise KDCacheError(f"row {sample_id}: token id {int(ids[slots].max())} is outside the tokenizer's "
                               f"{vocab_size} tokens")
        if (not trained.any() or not np.isfinite(logprobs[slots]).all()
                or (fmt == "axolotl" and len(trained) != len(tokens))):
            yield sample_id, None  # no trained position, damaged targets, or a row cut short (axolotl)
            continue
        ids, logprobs = np.where(slots, ids, 0), np.where(slots, logprobs, -np.inf)  # unread slots: empty
        order = np.argsort(-logprobs, axis=1, kind="stable")
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
        tail = (np.full(len(ids), -np.inf) if spec.renormalised
                else np.where(mass < 1 - 1e-6, np.log1p(-np.minimum(mass, 1.0)), -np.inf))
        yield sample_id, CachedSequence(sample_id=sample_id, input_ids=tokens[:len(trained)],
                                        topk_ids=np.take_along_axis(ids, order, axis=1),
                                        topk_logprobs=logprobs, tail_logprob=tail.astype(np.float32),
                                        target_positions=np.flatnonzero(trained).astype(np.int32) if masked else None)


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
    masks = [name for name in MASK_COLUMNS if name in rows.column_names]
    optional = ("target_positions",) if masks else ()
    _new_directory(out)
    try:
        schema = shard_schema(top_k=k, vocab_size=vocab_size, logprob_dtype="float32", hidden_sizes={},
                              dump_fingerprint=fingerprint, optional_columns=optional)
        skipped = []
        with ShardWriter(out, schema, shard_rows=shard_rows) as writer:
            for start in range(0, len(rows), ROWS_PER_BATCH):
                table = rows.select_columns(["input_ids", spec.ids, spec.logprobs, *masks]).with_format("arrow")[
                    start:start + ROWS_PER_BATCH]
                batch = []
                for sample_id, sequence in _imported_rows(table, start, spec, vocab_size, fmt, bool(masks)):
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
            raise KDCacheError(f"no row of {source} holds a usable target (see `stats.skipped_sample_ids`)")
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
                     "hidden_sizes": {}, "hidden_columns": []} | ({"optional": list(optional)} if optional else {}),
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
