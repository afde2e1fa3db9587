"""`dump-teacher`: run a teacher once over a dataset and write its targets to a cache.

Reads top to bottom: validate settings, load tokenizer, data and model, claim the output
directory, then loop (tokenize a batch → forward under `inference_mode` → top-k and tail on the
device → write rows) and commit the manifest last. Device placement and precision come from
Accelerate, so the same code runs on a laptop CPU and on GPUs. What differs between causal LMs and
classifiers (model class, tokenization, target positions, classes) comes from kdcache/tasks.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import __version__
from .cache.format import (DATA_DIR, MANIFEST_NAME, MAX_SAMPLES, OPTIONAL_COLUMNS, TARGET_TYPES, TOKENIZER_DIR,
                           Manifest, hidden_column, sha256_json, shard_schema, teacher_fingerprint, token_id_type,
                           tokenizer_fingerprint, write_json_atomic)
from .cache.writer import CachedSequence, Ragged, ShardWriter
from .data import check_columns, describe, load_rows
from .errors import KDCacheError
from .fidelity import FidelityCard
from .models import load_model, load_tokenizer, output_vocab_size
from .stats import StreamingSummary
from .targets import sampled_targets, sampling_uniforms, topk_targets
from .tasks import CAUSAL_LM, FULL_DISTRIBUTION_MAX_LABELS, Task, dataset_columns, pooler, resolve_task

IN_PROGRESS_NAME = "kdcache.dump.json"


@dataclasses.dataclass
class DumpSettings:
    """Every setting of a dump; all but batch_size and shard_rows change the cache's content."""

    top_k: int = 64
    max_length: int = 1024
    batch_size: int = 8
    hidden_layers: tuple[int, ...] = ()
    limit: int | None = None
    dtype: str = "auto"
    logprob_dtype: str = "float16"
    shard_rows: int = 10_000
    split: str = "train"
    text_column: str = "text"
    targets: str = "topk"   # "topk", "sampled" or "both"
    samples: int = 50       # draws per position for sampled targets
    seed: int = 0           # seeds the draws (with each sample id)
    task: str | None = None  # None: inferred from the teacher's config
    tokens_column: str = "tokens"        # token classification: word lists
    labels_column: str | None = None     # token classification: per-word labels (default: 'ner_tags' if present)
    label_column: str | None = None      # sequence classification: one label (default: 'label' if present)
    text_pair_column: str | None = None  # sequence classification: second text of a pair
    pooled: bool = False                 # encoders: also cache the pooler's output

    @property
    def target_types(self) -> tuple[str, ...]:
        return TARGET_TYPES if self.targets == "both" else (self.targets,)

    def content_settings(self) -> dict[str, Any]:
        """Settings that change the cache's bytes; the sampling ones only when something is sampled,
        so a top-k dump keeps the fingerprint it had before sampled targets existed."""
        settings = dataclasses.asdict(self)
        del settings["batch_size"], settings["shard_rows"]
        if "sampled" not in self.target_types:
            del settings["targets"], settings["samples"], settings["seed"]
        if self.task in (None, CAUSAL_LM):  # causal-LM fingerprints stay what they were before tasks existed
            for name in _CLASSIFICATION_SETTINGS:
                del settings[name]
        return settings


_CLASSIFICATION_SETTINGS = ("task", "tokens_column", "labels_column", "label_column", "text_pair_column", "pooled")


def _normalise_layers(layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Map HF `hidden_states` indices (negatives allowed) to 0..num_layers; reject the rest."""
    count = num_layers + 1
    resolved = []
    for layer in layers:
        if not -count <= layer < count:
            raise KDCacheError(f"hidden layer {layer} out of range: the teacher has hidden_states "
                               f"0..{num_layers} (or -{count}..-1)")
        resolved.append(layer % count)
    return sorted(set(resolved))


def _claim_output(out: Path, fingerprint: str) -> None:
    """Make `out` ours for this dump, refusing to touch a directory holding anything else.

    A directory with a finished cache of the same fingerprint is an error too (nothing to do,
    and overwriting a cache someone may be reading is never silent). An interrupted dump with
    the same fingerprint is restarted; one with a different fingerprint is refused.
    """
    if (out / MANIFEST_NAME).exists():
        existing = Manifest.load(out)
        if existing.dump_fingerprint == fingerprint:
            raise KDCacheError(f"{out} already holds this cache (same teacher, data and settings); nothing to do")
        raise KDCacheError(f"{out} already holds a different cache; choose another --out or delete it")
    marker = out / IN_PROGRESS_NAME
    if marker.exists():
        if json.loads(marker.read_text()).get("dump_fingerprint") != fingerprint:
            raise KDCacheError(f"{out} holds an interrupted dump with different settings; "
                               f"choose another --out or delete it")
        shutil.rmtree(out / DATA_DIR, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise KDCacheError(f"output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"dump_fingerprint": fingerprint})


def _batches(rows, column: str, tokenizer, settings: DumpSettings):
    """Yield (sample_ids, token id lists) per batch; tokenization happens here, lazily."""
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start:start + settings.batch_size][column]
        if column == "input_ids":
            token_lists = [list(ids)[:settings.max_length] for ids in chunk]
        else:
            if any(not isinstance(text, str) for text in chunk):
                raise KDCacheError(f"column '{column}' must hold strings; row {start} onwards has "
                                   f"{type(next(t for t in chunk if not isinstance(t, str))).__name__}")
            token_lists = tokenizer(chunk, truncation=True, max_length=settings.max_length)["input_ids"]
        kept = [(start + offset, ids) for offset, ids in enumerate(token_lists) if len(ids) > 0]
        if kept:
            yield [sample_id for sample_id, _ in kept], [ids for _, ids in kept]


def _task_batches(task: Task, rows, column: str | None, tokenizer, classes: list[str], settings: DumpSettings,
                  source: str):
    """(batches of (sample_ids, token lists, annotations), optional columns the rows carry).

    Causal LMs use `_batches` (annotations None). A classification task's first batch is made here,
    so data errors surface before the output directory is touched and the schema knows which
    optional columns (labels, token types) the rows have.
    """
    if task.name == CAUSAL_LM:
        return ((ids, tokens, None) for ids, tokens in _batches(rows, column, tokenizer, settings)), ()
    batches = task.batches(rows, tokenizer, classes, settings, source)
    first = next(batches, None)
    if first is None:
        raise KDCacheError(f"dataset {source} has no row with anything to classify")
    optional = tuple(name for name in OPTIONAL_COLUMNS if getattr(first[2][0], name) is not None)
    return itertools.chain([first], batches), optional


def _pad(token_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in token_lists)
    input_ids = torch.zeros(len(token_lists), length, dtype=torch.long)
    mask = torch.zeros(len(token_lists), length, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return input_ids.to(device), mask.to(device)


def dump_teacher(teacher: str, data: str, out: Path | str, settings: DumpSettings,
                 progress: bool = True) -> Manifest:
    """Dump `teacher`'s targets on `data` into the cache directory `out`; return its manifest."""
    out = Path(out)
    for name in ("top_k", "batch_size", "max_length", "shard_rows"):
        if getattr(settings, name) <= 0:
            raise KDCacheError(f"--{name.replace('_', '-')} must be positive, got {getattr(settings, name)}")
    if settings.limit is not None and settings.limit <= 0:
        raise KDCacheError(f"--limit must be positive, got {settings.limit}")
    if settings.targets not in (*TARGET_TYPES, "both"):
        raise KDCacheError(f"--targets must be topk, sampled or both, got {settings.targets!r}")
    if not 0 < settings.samples <= MAX_SAMPLES:
        raise KDCacheError(f"--samples must be between 1 and {MAX_SAMPLES}, got {settings.samples}")

    tokenizer = load_tokenizer(teacher, "teacher tokenizer")
    task, config = resolve_task(settings.task, teacher)
    if task.name != CAUSAL_LM and settings.targets != "topk":
        raise KDCacheError(f"--targets {settings.targets} is for causal LMs: a {task.name} cache stores the teacher's "
                           f"label distribution as top-k (every label, up to {FULL_DISTRIBUTION_MAX_LABELS}); "
                           f"use --targets topk")
    rows = load_rows(data, settings.split)
    column = check_columns(rows, settings.text_column, data) if task.name == CAUSAL_LM else None
    dataset_info = describe(rows, data, settings.split, settings.text_column) | dataset_columns(task, settings)
    if settings.limit is not None:
        rows = rows.select(range(min(settings.limit, len(rows))))

    vocab_size = len(tokenizer)
    classes = task.class_names(config)
    num_classes = len(classes) or vocab_size
    settings = dataclasses.replace(settings, task=task.name, top_k=task.top_k(settings.top_k, num_classes))
    if not 0 < settings.top_k <= vocab_size:
        raise KDCacheError(f"--top-k {settings.top_k} is larger than the vocabulary ({vocab_size} tokens)")
    model = load_model(teacher, "teacher", settings.dtype, task.auto_class)
    if task.name == CAUSAL_LM and output_vocab_size(model) < vocab_size:
        raise KDCacheError(f"teacher outputs {output_vocab_size(model)} logits but its tokenizer has "
                           f"{vocab_size} tokens: tokenizer and model do not belong together")
    layers = _normalise_layers(settings.hidden_layers, model.config.num_hidden_layers)
    batches, optional = _task_batches(task, rows, column, tokenizer, classes, settings, data)
    pool = pooler(model) if settings.pooled else None
    pooled_size = model.config.hidden_size if settings.pooled else None
    hidden_sizes = {layer: model.config.hidden_size for layer in layers}

    teacher_info = teacher_fingerprint(model, teacher)
    tokenizer_info = tokenizer_fingerprint(tokenizer)
    fingerprint = sha256_json({"teacher": teacher_info, "tokenizer": tokenizer_info, "dataset": dataset_info,
                               "settings": settings.content_settings()})
    _claim_output(out, fingerprint)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)

    schema = shard_schema(top_k=settings.top_k, vocab_size=num_classes, logprob_dtype=settings.logprob_dtype,
                          hidden_sizes=hidden_sizes, dump_fingerprint=fingerprint,
                          target_types=settings.target_types, optional_columns=optional, pooled_size=pooled_size)
    id_dtype = np.uint16 if token_id_type(num_classes).bit_width == 16 else np.uint32
    logprob_dtype = np.float16 if settings.logprob_dtype == "float16" else np.float32

    accelerator = Accelerator()
    model = accelerator.prepare_model(model, evaluation_mode=True)
    model.eval()

    captured = StreamingSummary()
    fidelity = FidelityCard(num_classes, settings.target_types, top_k=settings.top_k,
                            draws=settings.samples if "sampled" in settings.target_types else None)
    nll_sum, nll_count, nonfinite = 0.0, 0, 0
    content_hash = hashlib.sha256()
    started = time.perf_counter()
    bar = tqdm(total=len(rows), desc="dump-teacher", unit="seq", disable=not progress)
    with ShardWriter(out, schema, shard_rows=settings.shard_rows, prefix="shard-00000") as writer:
        for sample_ids, token_lists, annotations in batches:
            input_ids, mask = _pad(token_lists, accelerator.device)
            segments = {} if annotations is None or annotations[0].token_type_ids is None else {
                "token_type_ids": _pad([a.token_type_ids for a in annotations], accelerator.device)[0]}
            with torch.inference_mode():
                output = model(input_ids=input_ids, attention_mask=mask,
                               output_hidden_states=bool(layers) or settings.pooled, **segments)
                pooled = None if pool is None else pool(output.hidden_states[-1]).to(torch.float16).cpu().numpy()
            valid = mask.bool()
            logits, gold = task.target_logits(output.logits, input_ids, valid, annotations)
            targets = topk_targets(logits, gold, vocab_size=num_classes, top_k=settings.top_k)
            sampled = None
            if "sampled" in settings.target_types:  # causal LMs only: targets are the tokens themselves
                uniforms = sampling_uniforms(sample_ids, [len(ids) for ids in token_lists], settings.samples,
                                             settings.seed)
                sampled = sampled_targets(logits, uniforms, vocab_size=num_classes)
            fidelity.add(logits, targets, sampled)
            hidden = {layer: output.hidden_states[layer][valid].to(torch.float16).cpu().numpy() for layer in layers}

            tail = targets.tail_logprob.cpu().numpy()
            finite = np.isfinite(targets.logprobs.cpu().numpy()).all(axis=1)
            nonfinite += int((~finite).sum())
            captured.add(-np.expm1(tail))
            next_logprob = targets.next_logprob.cpu().numpy()
            has_next = ~np.isnan(next_logprob)
            nll_sum -= float(next_logprob[has_next].sum())
            nll_count += int(has_next.sum())

            ids = targets.ids.cpu().numpy().astype(id_dtype)
            logprobs = targets.logprobs.cpu().numpy().astype(logprob_dtype)
            if sampled is not None:
                offsets = sampled.offsets.cpu().numpy()
                drawn_ids = Ragged(sampled.ids.cpu().numpy().astype(id_dtype), offsets)
                drawn_counts = Ragged(sampled.counts.cpu().numpy().astype(np.uint16), offsets)
            topk_columns = "topk" in settings.target_types
            sequences, offset, target_offset = [], 0, 0
            for sample_id, tokens, annotation in zip(sample_ids, token_lists,
                                                     annotations or [None] * len(sample_ids)):
                span = slice(offset, offset + len(tokens))
                offset += len(tokens)
                count = len(tokens) if annotation is None else len(annotation.target_positions)
                at = slice(target_offset, target_offset + count)
                target_offset += count
                token_array = np.asarray(tokens, dtype=np.int32)
                content_hash.update(np.int64(sample_id).tobytes() + token_array.tobytes())
                sequences.append(CachedSequence(
                    sample_id=sample_id, input_ids=token_array,
                    topk_ids=ids[at] if topk_columns else None,
                    topk_logprobs=logprobs[at] if topk_columns else None,
                    tail_logprob=tail[at] if topk_columns else None,
                    hidden={layer: values[span] for layer, values in hidden.items()},
                    sampled_ids=drawn_ids.positions(at) if sampled is not None else None,
                    sampled_counts=drawn_counts.positions(at) if sampled is not None else None,
                    **({} if annotation is None else vars(annotation)),
                    pooled=None if pooled is None else pooled[len(sequences)][None]))
            writer.write(sequences)
            bar.update(sample_ids[-1] + 1 - bar.n)
            bar.set_postfix(tok_s=f"{captured.count / (time.perf_counter() - started):.0f}")
        shards = writer.close()
    bar.close()
    if not shards:
        raise KDCacheError(f"dataset {data} produced no tokens (every row is empty)")
    if nonfinite:
        raise KDCacheError(f"teacher produced NaN/inf logits at {nonfinite} positions; "
                           f"try --dtype float32 (no cache was committed)")

    elapsed = time.perf_counter() - started
    manifest = Manifest(
        task=task.name,
        teacher=teacher_info,
        tokenizer={**tokenizer_info, "model_vocab_size": (output_vocab_size(accelerator.unwrap_model(model))
                                                          if task.name == CAUSAL_LM else model.config.vocab_size)},
        dataset={**dataset_info, "rows_dumped": sum(shard.rows for shard in shards)},
        settings=dataclasses.asdict(settings) | {"hidden_layers": layers},
        columns={"targets": list(settings.target_types),
                 "topk_ids": str(token_id_type(num_classes)), "topk_logprobs": settings.logprob_dtype,
                 "hidden_sizes": {str(layer): size for layer, size in hidden_sizes.items()},
                 "hidden_columns": [hidden_column(layer) for layer in layers]}
                | ({"optional": list(optional)} if optional else {})
                | ({"pooled_size": pooled_size} if pooled_size else {}),
        dump_fingerprint=fingerprint,
        shards=shards,
        stats={"tokens": captured.count, "fidelity": fidelity.summary(),
               **({"captured_mass": captured.summary()} if "topk" in settings.target_types else {}),
               "teacher_nll": round(nll_sum / nll_count, 6) if nll_count else None,
               "content_sha256": content_hash.hexdigest(),
               "seconds": round(elapsed, 3), "tokens_per_second": round(captured.count / elapsed, 1)},
        kdcache_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        labels=classes,
    )
    manifest.save(out)
    (out / IN_PROGRESS_NAME).unlink(missing_ok=True)
    return manifest
