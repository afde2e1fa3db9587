"""`dump-teacher`: run a teacher once over a dataset and write its targets to a cache.

Reads top to bottom: validate settings, load tokenizer, data and model, plan the shards (shard i
always holds rows [i·shard_rows, (i+1)·shard_rows)), let the main process lock the output and find
the shards an interrupted run already finished, then each process computes its share of the rest
(planned shard i belongs to process i mod N): tokenize a window of rows → length-sorted batches →
forward under `inference_mode` → top-k and tail, sampled draws and fidelity-card figures on the
device → hand over to the background shard writer. The main process commits the manifest last,
once every process is done. Device placement and precision come from Accelerate, so the same
code runs on a laptop CPU, on many GPUs (`accelerate launch`), or with a teacher spread over a
machine's GPUs (`device_map="auto"`). What differs between causal LMs and classifiers (model
class, tokenization, target positions, classes) comes from kdcache/tasks.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from . import __version__
from .cache.format import (MAX_SAMPLES, OPTIONAL_COLUMNS, TARGET_TYPES, TOKENIZER_DIR, Manifest, hidden_column,
                           sha256_json, shard_schema, teacher_fingerprint, token_id_type, tokenizer_fingerprint)
from .cache.progress import DumpLock, claim_output, finish, load_records, resume_state
from .cache.reader import content_sha256
from .data import check_columns, describe, load_rows
from .dump_writer import BackgroundShardWriter, HostBatch, start_host_copy
from .errors import KDCacheError, require_positive
from .fidelity import FidelityCard
from .models import load_model, load_tokenizer, output_vocab_size
from .stats import StreamingSummary
from .targets import sampled_targets, sampling_uniforms, topk_targets
from .tasks import CAUSAL_LM, FULL_DISTRIBUTION_MAX_LABELS, Annotation, Task, dataset_columns, pooler, resolve_task

# Rows are sorted by length within windows of this many batches, so batches carry little padding
# while the rows of a window (written in sample-id order) stay a bounded amount of host memory.
WINDOW_BATCHES = 16

T = TypeVar("T")


@dataclasses.dataclass
class DumpSettings:
    """Every setting of a dump; `content_settings()` are those that change what the cache holds.

    `device_map` (placement) and `skip_nonfinite` (whether to commit without rows whose targets are
    NaN/inf) never change a written row, so a dump may be resumed with other values of them.
    """

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
    device_map: str | None = None
    skip_nonfinite: bool = False
    targets: str = "topk"   # "topk", "sampled" or "both"
    samples: int = 50       # draws per position for sampled targets
    fidelity_every: int = 8  # the fidelity card measures every N-th target position (1 = all)
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
        settings = self.resume_settings()
        del settings["batch_size"], settings["shard_rows"], settings["fidelity_every"]
        if "sampled" not in self.target_types:
            del settings["targets"], settings["samples"], settings["seed"]
        if self.task in (None, CAUSAL_LM):  # causal-LM fingerprints stay what they were before tasks existed
            for name in _CLASSIFICATION_SETTINGS:
                del settings[name]
        return settings

    def resume_settings(self) -> dict[str, Any]:
        """What a resumed dump must share with the interrupted one: the same rows, batched the same way."""
        settings = dataclasses.asdict(self)
        del settings["device_map"], settings["skip_nonfinite"]
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


def _plan(num_rows: int, shard_rows: int) -> list[range]:
    """Shard i holds rows [i·shard_rows, (i+1)·shard_rows): fixed, whatever the number of processes."""
    return [range(start, min(start + shard_rows, num_rows)) for start in range(0, num_rows, shard_rows)]


def _tokenize(rows, start: int, stop: int, column: str, tokenizer, settings: DumpSettings) -> list[list[int]]:
    chunk = rows[start:stop][column]
    if column == "input_ids":
        return [list(ids)[:settings.max_length] for ids in chunk]
    if any(not isinstance(text, str) for text in chunk):
        raise KDCacheError(f"column '{column}' must hold strings; row {start} onwards has "
                           f"{type(next(t for t in chunk if not isinstance(t, str))).__name__}")
    return tokenizer(chunk, truncation=True, max_length=settings.max_length)["input_ids"]


@dataclasses.dataclass
class _Rows:
    """Where a dump's rows come from and how the task turns them into tokens (see `_window_items`)."""

    task: Task
    rows: Any
    column: str | None  # causal LM: the text (or input_ids) column
    tokenizer: Any
    classes: list[str]
    source: str


def _window_items(source: _Rows, start: int, stop: int, settings: DumpSettings
                  ) -> list[tuple[int, list[int], Annotation | None]]:
    """(sample id, token ids, annotation) of rows [start, stop) that have something to target.

    A classification task tokenizes the window as one of its batches (word alignment, text pairs,
    labels).
    """
    if source.task.name == CAUSAL_LM:
        token_lists = _tokenize(source.rows, start, stop, source.column, source.tokenizer, settings)
        return [(sample_id, ids, None) for sample_id, ids in zip(range(start, stop), token_lists) if len(ids) > 0]
    window = dataclasses.replace(settings, batch_size=stop - start)
    return [(sample_id, ids, annotation)
            for sample_ids, token_lists, annotations in source.task.batches(
                source.rows, range(start, stop), source.tokenizer, source.classes, window, source.source)
            for sample_id, ids, annotation in zip(sample_ids, token_lists, annotations)]


def _windows(source: _Rows, shard: range, settings: DumpSettings
             ) -> Iterator[tuple[list[tuple[list[int], list[list[int]], list[Annotation] | None]], int]]:
    """Yield (batches, rows covered) per window of a planned shard; tokenization happens here, lazily.

    Within a window, rows with a target are sorted longest first (ties by sample id) and cut into
    batches: little padding, the out-of-memory case shows on the first batch, and the batches
    depend only on the shard, so a shard's bytes do not depend on which process or run made it.
    """
    window_rows = settings.batch_size * WINDOW_BATCHES
    for start in range(shard.start, shard.stop, window_rows):
        stop = min(start + window_rows, shard.stop)
        kept = sorted(_window_items(source, start, stop, settings), key=lambda item: (-len(item[1]), item[0]))
        batches = []
        for first in range(0, len(kept), settings.batch_size):
            sample_ids, token_lists, annotations = map(list, zip(*kept[first:first + settings.batch_size]))
            batches.append((sample_ids, token_lists, None if annotations[0] is None else annotations))
        yield batches, stop - start


def _optional_columns(source: _Rows, settings: DumpSettings) -> tuple[str, ...]:
    """The optional columns (labels, token types, target positions) the task's rows carry.

    Read off the first row with a target, before the output directory is touched, so data errors
    surface early and every process's shards share one schema.
    """
    if source.task.name == CAUSAL_LM:
        return ()
    window_rows = settings.batch_size * WINDOW_BATCHES
    for start in range(0, len(source.rows), window_rows):
        items = _window_items(source, start, min(start + window_rows, len(source.rows)), settings)
        if items:
            return tuple(name for name in OPTIONAL_COLUMNS if getattr(items[0][2], name) is not None)
    raise KDCacheError(f"dataset {source.source} has no row with anything to classify")


def _pad(token_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in token_lists)
    input_ids = torch.zeros(len(token_lists), length, dtype=torch.long)
    mask = torch.zeros(len(token_lists), length, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return input_ids.to(device), mask.to(device)


def _teacher_targets(model, input_device, sample_ids: list[int], token_lists: list[list[int]],
                     annotations: list[Annotation] | None, *, task: Task, vocab_size: int, layers: list[int],
                     pool, logprob_dtype: torch.dtype, card: FidelityCard, settings: DumpSettings) -> HostBatch:
    """One forward pass; top-k, tail, sampled draws, the fidelity figures and the finite check run on
    the device, then the copy home starts.

    Everything is narrowed on the device (int32 ids, the stored log-prob dtype, float16 hidden
    states) so the device→host copies move no more bytes than the shard will hold. The valid rows'
    logits are gathered once (at the task's target positions: every token of a causal LM) and left
    untouched: the draws and the fidelity card read them after the top-k. Draws are seeded per
    sample id, so they do not depend on batching or process. `vocab_size` is the number of classes.
    """
    input_ids, mask = _pad(token_lists, input_device)
    segments = {} if annotations is None or annotations[0].token_type_ids is None else {
        "token_type_ids": _pad([annotation.token_type_ids for annotation in annotations], input_device)[0]}
    with torch.inference_mode():
        output = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=bool(layers) or pool is not None,
                       **segments)
        valid = mask.bool()
        logits, gold = task.target_logits(output.logits, input_ids.to(output.logits.device),
                                          valid.to(output.logits.device), annotations)
        targets = topk_targets(logits, gold, vocab_size=vocab_size, top_k=settings.top_k)
        sampled = None
        if "sampled" in settings.target_types:  # causal LMs only: targets are the tokens themselves
            uniforms = sampling_uniforms(sample_ids, [len(ids) for ids in token_lists], settings.samples, settings.seed)
            sampled = sampled_targets(logits, uniforms, vocab_size=vocab_size)
        tensors = {"finite": torch.isfinite(targets.logprobs).all(dim=1), "tail": targets.tail_logprob,
                   "next_logprob": targets.next_logprob, **card.figures(logits, targets, sampled)}
        if "topk" in settings.target_types:
            tensors |= {"ids": targets.ids.to(torch.int32), "logprobs": targets.logprobs.to(logprob_dtype)}
        if sampled is not None:
            tensors |= {"sampled_ids": sampled.ids.to(torch.int32), "sampled_counts": sampled.counts.to(torch.int32),
                        "sampled_offsets": sampled.offsets}
        for layer in layers:
            states = output.hidden_states[layer]
            tensors[hidden_column(layer)] = states[valid.to(states.device)].to(torch.float16).to(output.logits.device)
        if pool is not None:
            tensors["pooled"] = pool(output.hidden_states[-1]).to(torch.float16).to(output.logits.device)
        return start_host_copy(sample_ids, token_lists, tensors, annotations)


def _on_main_process(accelerator: Accelerator, step: Callable[[], T]) -> T:
    """Run `step` on the main process only and hand its result, or its user error, to every process.

    This is also a barrier: no process goes on before the main process has finished `step`.
    """
    if accelerator.num_processes == 1:
        return step()
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", step())]
        except KDCacheError as error:
            outcome = [("error", str(error))]
    broadcast_object_list(outcome)
    status, value = outcome[0]
    if status == "error":
        raise KDCacheError(value)
    return value


def _load_teacher(teacher: str, task: Task, settings: DumpSettings, accelerator: Accelerator):
    """The task's model, placed by Accelerate, or spread over the devices by `device_map` for big teachers."""
    model = load_model(teacher, "teacher", settings.dtype, task.auto_class, device_map=settings.device_map)
    if settings.device_map is None:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    return model.eval()


def dump_teacher(teacher: str, data: str, out: Path | str, settings: DumpSettings,
                 progress: bool = True) -> Manifest:
    """Dump `teacher`'s targets on `data` into the cache directory `out`; return its manifest.

    Rerunning it after an interruption resumes: finished shards are kept, the rest is computed.
    Under `accelerate launch` every process calls it with the same arguments.
    """
    out = Path(out)
    require_positive(settings, "top_k", "batch_size", "max_length", "shard_rows", "limit", "fidelity_every")
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
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # every process would dump everything
        raise KDCacheError(f"launched as {launched} processes but Accelerate runs {accelerator.num_processes}: "
                           f"without GPUs set ACCELERATE_USE_CPU=true (see README, 'Dump at scale')")
    model = _load_teacher(teacher, task, settings, accelerator)
    if task.name == CAUSAL_LM and output_vocab_size(model) < vocab_size:
        raise KDCacheError(f"teacher outputs {output_vocab_size(model)} logits but its tokenizer has "
                           f"{vocab_size} tokens: tokenizer and model do not belong together")
    layers = _normalise_layers(settings.hidden_layers, model.config.num_hidden_layers)
    source = _Rows(task, rows, column, tokenizer, classes, data)
    optional = _optional_columns(source, settings)
    pool = pooler(accelerator.unwrap_model(model)) if settings.pooled else None
    pooled_size = model.config.hidden_size if settings.pooled else None
    hidden_sizes = {layer: model.config.hidden_size for layer in layers}

    teacher_info = teacher_fingerprint(model, teacher)
    tokenizer_info = tokenizer_fingerprint(tokenizer)
    fingerprint = sha256_json({"teacher": teacher_info, "tokenizer": tokenizer_info, "dataset": dataset_info,
                               "settings": settings.content_settings()})
    plan = _plan(len(rows), settings.shard_rows)
    new_card = functools.partial(FidelityCard, num_classes, settings.target_types, top_k=settings.top_k,
                                 draws=settings.samples if "sampled" in settings.target_types else None,
                                 every=settings.fidelity_every)
    lock: DumpLock | None = None

    def claim() -> list[int]:
        nonlocal lock
        lock = claim_output(out, {"dump_fingerprint": fingerprint, "settings": settings.resume_settings()})
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
        return sorted(resume_state(out))

    try:
        finished_before = set(_on_main_process(accelerator, claim))
        schema = shard_schema(top_k=settings.top_k, vocab_size=num_classes, logprob_dtype=settings.logprob_dtype,
                              hidden_sizes=hidden_sizes, dump_fingerprint=fingerprint,
                              target_types=settings.target_types, optional_columns=optional,
                              pooled_size=pooled_size)
        mine = [index for index in range(len(plan))
                if index % accelerator.num_processes == accelerator.process_index and index not in finished_before]
        started = time.perf_counter()
        writer = BackgroundShardWriter(
            out, schema, shard_rows=settings.shard_rows, rank=accelerator.process_index,
            id_dtype=np.uint16 if token_id_type(num_classes).bit_width == 16 else np.uint32,
            logprob_dtype=np.float16 if settings.logprob_dtype == "float16" else np.float32, hidden_layers=layers,
            new_card=new_card)
        bar = tqdm(total=sum(len(plan[index]) for index in mine), desc="dump-teacher", unit="seq",
                   disable=not (progress and accelerator.is_local_main_process))
        try:
            _compute_shards(model, source, settings, [(index, plan[index]) for index in mine], writer, bar,
                            vocab_size=num_classes, layers=layers, pool=pool, card=new_card())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        accelerator.wait_for_everyone()
        elapsed = time.perf_counter() - started

        def commit() -> Manifest:
            unwrapped = accelerator.unwrap_model(model)
            model_vocab_size = output_vocab_size(unwrapped) if task.name == CAUSAL_LM else unwrapped.config.vocab_size
            manifest = _commit_manifest(
                out, plan, settings, finished_before, elapsed, teacher=teacher_info,
                tokenizer={**tokenizer_info, "model_vocab_size": model_vocab_size},
                dataset=dataset_info, layers=layers, hidden_sizes=hidden_sizes, fingerprint=fingerprint,
                num_processes=accelerator.num_processes, fidelity=new_card(), classes=classes,
                num_classes=num_classes, optional=optional, pooled_size=pooled_size)
            finish(out, lock)
            return manifest

        return _on_main_process(accelerator, commit)
    finally:
        if lock is not None:
            lock.release()


def _compute_shards(model, source: _Rows, settings: DumpSettings, shards: list[tuple[int, range]],
                    writer: BackgroundShardWriter, bar: tqdm, *, vocab_size: int, layers: list[int], pool,
                    card: FidelityCard) -> None:
    """This process's share of the work: the teacher runs here, everything after it in `writer`."""
    input_device = model.get_input_embeddings().weight.device
    logprob_dtype = torch.float16 if settings.logprob_dtype == "float16" else torch.float32
    started, tokens = time.perf_counter(), 0
    for index, shard in shards:
        writer.begin_shard(index)
        for batches, covered in _windows(source, shard, settings):
            for sample_ids, token_lists, annotations in batches:
                writer.submit(_teacher_targets(model, input_device, sample_ids, token_lists, annotations,
                                               task=source.task, vocab_size=vocab_size, layers=layers, pool=pool,
                                               logprob_dtype=logprob_dtype, card=card, settings=settings))
                tokens += sum(len(ids) for ids in token_lists)
            writer.end_window()
            bar.update(covered)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        writer.end_shard()


def _commit_manifest(out: Path, plan: list[range], settings: DumpSettings, finished_before: set[int],
                     elapsed: float, *, teacher: dict, tokenizer: dict, dataset: dict, layers: list[int],
                     hidden_sizes: dict[int, int], fingerprint: str, num_processes: int,
                     fidelity: FidelityCard, classes: list[str], num_classes: int, optional: tuple[str, ...],
                     pooled_size: int | None) -> Manifest:
    """Merge the records of every planned shard into the manifest and write it: the cache is complete."""
    records = load_records(out)
    missing = [index for index in range(len(plan)) if index not in records]
    if missing:
        raise KDCacheError(f"{len(missing)} planned shards were not written (first: {missing[0]}): a process "
                           f"failed; rerun the same command to resume")
    ordered = [records[index] for index in range(len(plan))]
    nonfinite_positions = sum(record.nonfinite_positions for record in ordered)
    nonfinite_ids = sorted(sample_id for record in ordered for sample_id in record.nonfinite_sample_ids)
    if nonfinite_positions and not settings.skip_nonfinite:
        raise KDCacheError(f"teacher produced NaN/inf logits at {nonfinite_positions} positions in "
                           f"{len(nonfinite_ids)} sequences (sample ids {nonfinite_ids[:5]}); no cache was "
                           f"committed: rerun with --skip-nonfinite to commit it without them, or try "
                           f"--dtype float32 with another --out")
    shards = [record.shard for record in ordered if record.shard is not None]
    if not shards:
        raise KDCacheError(f"dataset {dataset['source']} produced no tokens (every row is empty)")
    captured = StreamingSummary()
    for record in ordered:
        captured.merge(StreamingSummary.from_state(record.captured))
        fidelity.merge_state(record.fidelity)
    nll_sum = sum(record.nll_sum for record in ordered)
    nll_count = sum(record.nll_count for record in ordered)
    new_tokens = sum(records[index].shard.tokens for index in range(len(plan))
                     if index not in finished_before and records[index].shard is not None)
    manifest = Manifest(
        task=settings.task,
        teacher=teacher,
        tokenizer=tokenizer,
        dataset={**dataset, "rows_dumped": sum(shard.rows for shard in shards)},
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
               "content_sha256": content_sha256(out, shards),
               "nonfinite_positions": nonfinite_positions, "skipped_sample_ids": nonfinite_ids,
               "num_processes": num_processes, "resumed_shards": len(finished_before),
               "seconds": round(elapsed, 3), "tokens_per_second": round(new_tokens / max(elapsed, 1e-9), 1)},
        kdcache_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        labels=classes,
    )
    manifest.save(out)
    return manifest
