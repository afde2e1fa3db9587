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
class, tokenization, target positions, classes) comes from kdcache/tasks/.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from .. import __version__
from ..cache.card import write_card
from ..cache.codecs import round_logprobs
from ..cache.format import (
    STORED_TYPES,
    TOKENIZER_DIR,
    Manifest,
    column_groups,
    hidden_column,
    sha256_json,
    shard_schema,
    token_id_type,
    tokenizer_files,
    tokenizer_fingerprint,
)
from ..cache.reader import content_sha256
from ..cache.stats import StreamingSummary, shard_stats
from ..errors import KDCacheError, warn
from ..fused import HeadLogits, OutputHead
from ..models import backbone_only, load_model, load_tokenizer, output_head
from ..settings import applies_threads, recorded
from ..sources import check_dump_inputs
from ..tasks import FULL_DISTRIBUTION_MAX_LABELS, TOKEN_CLASSIFICATION, Annotation, Task, pooler, resolve_task
from ..tasks.unknown import unknown_tokens, unknown_warning
from .augment import augment_rows
from .data import describe, load_rows
from .fidelity import FidelityCard
from .fingerprint import teacher_fingerprint
from .hooks import DumpHooks
from .progress import DumpLock, claim_output, finish, load_records, resume_state
from .settings import DumpSettings
from .targets import sampled_targets, sampling_uniforms, select_head, tail_draws, topk_targets
from .windows import RowSource, optional_columns, pad_batch, plan_shards, window_items, windows
from .writer import BackgroundShardWriter, HostBatch, start_host_copy

T = TypeVar("T")

# The manifest lists at most this many sample ids per reason a row was dropped (the count is exact):
# enough to look at the rows, and a corpus with a million blank lines keeps a small manifest.
LISTED_DROPPED = 1000

# Rows whose tokens are checked for the tokenizer's unknown token before the teacher runs: enough to see a
# tokenizer that does not fit the text, and one window's tokenization whatever the size of the data.
UNKNOWN_SAMPLE_ROWS = 1000


def _normalise_layers(layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Map HF `hidden_states` indices (negatives allowed) to 0..num_layers; reject the rest."""
    count = num_layers + 1
    resolved = []
    for layer in layers:
        if not -count <= layer < count:
            raise KDCacheError(f"hidden layer {layer} out of range: the teacher has hidden states "
                               f"0..{num_layers} (or -{count}..-1)")
        resolved.append(layer % count)
    return sorted(set(resolved))


def _teacher_targets(model, input_device, sample_ids: list[int], token_lists: list[list[int]],
                     annotations: list[Annotation] | None, *, task: Task, vocab_size: int, layers: list[int],
                     pool, logprob_dtype: torch.dtype, card: FidelityCard, settings: DumpSettings,
                     head: OutputHead | None) -> HostBatch:
    """One forward pass; top-k, tail, sampled draws, the fidelity figures and the finite check run on
    the device, then the copy home starts.

    Everything is narrowed on the device (int32 ids, the stored log-prob dtype, float16 hidden
    states) so the device→host copies move no more bytes than the shard will hold. The valid rows'
    logits are gathered once (at the task's target positions: every token of a causal LM) and left
    untouched: the draws and the fidelity card read them after the top-k. Draws are seeded per
    sample id, so they do not depend on batching or process. `vocab_size` is the number of classes.
    With `head` (`fused_logits`), the model stops at its final hidden states and the logits are read through
    the head a chunk of positions at a time (`HeadLogits`): the same numbers, never [batch, length, vocab].
    """
    input_ids, mask = pad_batch(token_lists, input_device)
    segments = {} if annotations is None or annotations[0].token_type_ids is None else {
        "token_type_ids": pad_batch([annotation.token_type_ids for annotation in annotations], input_device)[0]}
    with torch.inference_mode():
        output = model(**task.model_inputs(input_ids, mask, annotations),
                       output_hidden_states=bool(layers) or pool is not None or head is not None, **segments,
                       **({} if head is None else backbone_only(input_device)))
        valid = mask.bool()
        scores = output.logits if head is None else output.hidden_states[-1]
        logits, gold = task.target_logits(scores, input_ids.to(scores.device), valid.to(scores.device), annotations)
        if head is not None:
            logits, gold = HeadLogits(logits, head), gold.to(head.weight.device)
        targets = topk_targets(logits, gold, vocab_size=vocab_size, top_k=settings.top_k,
                               overwrite_logits=head is not None)
        finite = torch.isfinite(targets.logprobs).all(dim=1)
        if settings.codec == "compact":  # a mass-adaptive head; empty slots are dropped by the codec
            targets = select_head(targets, top_k=settings.top_k, top_p=settings.top_p)
        sampled = None
        groups = column_groups(settings.target_types)
        if "sampled" in groups:  # causal LMs only: targets are the tokens themselves
            uniforms = sampling_uniforms(sample_ids, [len(ids) for ids in token_lists], settings.samples, settings.seed)
            sampled = sampled_targets(logits, uniforms, vocab_size=vocab_size,
                                      exclude=targets if settings.targets == "head-tail" else None,
                                      systematic=settings.sampling != "independent",
                                      draws_per_row=tail_draws(targets.tail_logprob, settings.samples)
                                      if settings.sampling == "proportional" and settings.targets == "head-tail" else None)
        tensors = {"finite": finite, "tail": targets.tail_logprob,
                   "next_logprob": targets.next_logprob, **card.figures(logits, targets, sampled)}
        if "topk" in groups:
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


def _unknown_tokens(source: RowSource, settings: DumpSettings, *, warn_now: bool) -> dict | None:
    """The share of unknown tokens in the first `UNKNOWN_SAMPLE_ROWS` rows (tasks/unknown.py), for the
    manifest's `stats.unknown_tokens`; warns when the tokenizer does not fit the text. A bounded sample, so
    the warning comes before the teacher loads and costs one window's tokenization whatever the data's size."""
    rows = min(len(source.rows), UNKNOWN_SAMPLE_ROWS)
    items, _ = window_items(source, 0, rows, settings)
    count = unknown_tokens((token_ids for _, token_ids, _ in items), source.tokenizer)
    if count is None:
        return None
    message = unknown_warning(count, f"the first {rows} rows")
    if message and warn_now:
        warn(message)
    return count | {"rows": rows}


def _stored_logprobs(settings: DumpSettings):
    """What a log-prob reads back as from the cache, for the fidelity card: the codec's rounding."""
    if settings.logprob_dtype == "uint8":
        return round_logprobs
    if settings.logprob_dtype == "float16":
        return lambda logprobs: logprobs.half()
    return lambda logprobs: logprobs


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


def _fused_head(model, task: Task, settings: DumpSettings) -> OutputHead | None:
    """The teacher's output head for `fused_logits`, or None (with a one-line warning naming why) where it cannot
    serve: a classifier's logits are `num_labels` wide, nothing worth chunking, so only causal LMs use it."""
    if not (settings.fused_logits and task.classes_are_vocabulary):
        return None
    try:
        return output_head(model)
    except KDCacheError as error:
        warn(f"`fused_logits` off, the teacher's full logits are computed: {error}")
        return None


def _load_teacher(teacher: str, task: Task, settings: DumpSettings, accelerator: Accelerator):
    """The task's model, placed by Accelerate, or spread over the devices by `device_map` for big teachers."""
    model = load_model(teacher, "teacher", settings.dtype, task.auto_class, device_map=settings.device_map)
    if settings.device_map is None:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    return model.eval()


def _augmented(rows, task: Task, tokenizer, model, classes: list[str], settings: DumpSettings,
               dataset_info: dict) -> tuple:
    """The rows followed by their teacher-labelled variants, and the dataset record that says so."""
    labels_column = dataset_info.get("labels_column") or ("ner_tags" if "ner_tags" in rows.column_names else None)
    label_column = dataset_info.get("label_column") or ("label" if "label" in rows.column_names else None)
    augmentation = settings.augmentation(tagged=task.name == TOKEN_CLASSIFICATION and labels_column is not None)
    augmented = augment_rows(rows, task.name, tokenizer, model.get_input_embeddings().weight, classes, augmentation,
                             text_column=settings.text_column, tokens_column=settings.tokens_column,
                             labels_column=labels_column, label_column=label_column)
    return augmented, dataset_info | {"augmentation": augmentation.record(len(rows))}


@applies_threads
def dump_teacher(teacher: str, data: str, out: Path | str, settings: DumpSettings,
                 progress: bool = True, hooks: DumpHooks = DumpHooks()) -> Manifest:
    """Dump `teacher`'s targets on `data` into the cache directory `out`; return its manifest.

    Rerunning it after an interruption resumes: finished shards are kept, the rest is computed.
    Rerunning it on a finished cache with the same teacher, data and settings returns that cache's
    manifest and computes nothing.
    Under `accelerate launch` every process calls it with the same arguments. `hooks` open the shard
    files.
    """
    out = Path(out)
    teacher = check_dump_inputs(teacher, data, settings.gguf_file)
    tokenizer = load_tokenizer(teacher, "teacher tokenizer")
    task, config = resolve_task(settings.task, teacher)
    settings = settings.resolved(task.supports_sampled_targets)
    if not task.supports_sampled_targets and settings.targets != "topk":
        raise KDCacheError(f"`targets` {settings.targets} is for causal LMs: a {task.name} cache stores the teacher's "
                           f"label distribution as top-k (every label, up to {FULL_DISTRIBUTION_MAX_LABELS}); "
                           f"use `targets` topk")
    rows = load_rows(data, settings.split)
    task.check_rows(rows, settings, data)
    dataset_info = describe(rows, data, settings.split, settings.text_column) | task.dataset_columns(settings)
    if settings.limit is not None:
        rows = rows.select(range(min(settings.limit, len(rows))))

    vocab_size = len(tokenizer)
    classes = task.class_names(config)
    num_classes = len(classes) or vocab_size
    settings = dataclasses.replace(settings, task=task.name, top_k=task.top_k(settings.top_k, num_classes))
    if not 0 < settings.top_k <= vocab_size:
        raise KDCacheError(f"`top_k` {settings.top_k} is larger than the vocabulary ({vocab_size} tokens)")
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # every process would dump everything
        raise KDCacheError(f"launched as {launched} processes but Accelerate runs {accelerator.num_processes}: "
                           f"without GPUs set ACCELERATE_USE_CPU=true (see README, 'Dump at scale')")
    source = RowSource(task, rows, tokenizer, classes, data)
    optional = optional_columns(source, settings)
    unknown = _unknown_tokens(source, settings, warn_now=accelerator.is_main_process)  # before the teacher loads
    model = _load_teacher(teacher, task, settings, accelerator)
    if task.classes_are_vocabulary and task.teacher_output_size(model) < vocab_size:
        raise KDCacheError(f"teacher outputs {task.teacher_output_size(model)} logits but its tokenizer has "
                           f"{vocab_size} tokens: tokenizer and model do not belong together")
    layers = _normalise_layers(settings.hidden_layers, model.config.num_hidden_layers)
    if settings.augment:  # the variants need the teacher's embeddings; the unknown-token check saw the rows
        rows, dataset_info = _augmented(rows, task, tokenizer, model, classes, settings, dataset_info)
        source = RowSource(task, rows, tokenizer, classes, data)
    pool = pooler(accelerator.unwrap_model(model)) if settings.pooled else None
    head = _fused_head(accelerator.unwrap_model(model), task, settings)
    pooled_size = model.config.hidden_size if settings.pooled else None
    hidden_sizes = {layer: model.config.hidden_size for layer in layers}

    teacher_info = teacher_fingerprint(model, teacher)
    tokenizer_info = tokenizer_fingerprint(tokenizer)
    fingerprint = sha256_json({"teacher": teacher_info, "tokenizer": tokenizer_info, "dataset": dataset_info,
                               "settings": settings.content_settings()})
    plan = plan_shards(len(rows), settings.shard_rows)
    codec = settings.stored_codec
    draws = settings.samples if "sampled" in column_groups(settings.target_types) else None
    new_card = functools.partial(FidelityCard, num_classes, settings.target_types, top_k=settings.top_k,
                                 draws=draws, every=settings.fidelity_every, stored=_stored_logprobs(settings))
    lock: DumpLock | None = None

    def claim() -> list[int] | None:
        """The planned shards an interrupted run finished; None when the cache is already complete."""
        nonlocal lock
        lock = claim_output(out, {"dump_fingerprint": fingerprint, "settings": settings.resume_settings()})
        if lock is None:
            return None
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
        return sorted(resume_state(out))

    try:
        finished = _on_main_process(accelerator, claim)
        if finished is None:
            return Manifest.load(out)
        finished_before = set(finished)
        schema = shard_schema(top_k=settings.top_k, vocab_size=num_classes, logprob_dtype=settings.logprob_dtype,
                              hidden_sizes=hidden_sizes, dump_fingerprint=fingerprint,
                              target_types=settings.target_types, optional_columns=optional,
                              pooled_size=pooled_size, codec=codec, draws=draws)
        mine = [index for index in range(len(plan))
                if index % accelerator.num_processes == accelerator.process_index and index not in finished_before]
        started = time.perf_counter()
        writer = BackgroundShardWriter(
            out, schema, shard_rows=settings.shard_rows, rank=accelerator.process_index,
            id_dtype=STORED_TYPES[str(token_id_type(num_classes))].numpy,
            # uint8 log-probs are coded from float32 on the host
            logprob_dtype=STORED_TYPES["float16" if settings.logprob_dtype == "float16" else "float32"].numpy,
            hidden_layers=layers,
            new_card=new_card, codec=codec, open_shard=hooks.open_shard)
        bar = tqdm(total=sum(len(plan[index]) for index in mine), desc="dump-teacher", unit="seq",
                   disable=not (progress and accelerator.is_local_main_process))
        try:
            _compute_shards(model, source, settings, [(index, plan[index]) for index in mine], writer, bar,
                            vocab_size=num_classes, layers=layers, pool=pool, card=new_card(), head=head)
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
            model_vocab_size = task.teacher_output_size(unwrapped)
            manifest = _commit_manifest(
                out, plan, settings, finished_before, elapsed, teacher=teacher_info,
                tokenizer={**tokenizer_info, "model_vocab_size": model_vocab_size,
                           **tokenizer_files(out / TOKENIZER_DIR)},
                dataset=dataset_info, layers=layers, hidden_sizes=hidden_sizes, fingerprint=fingerprint,
                num_processes=accelerator.num_processes, fidelity=new_card(), classes=classes,
                num_classes=num_classes, optional=optional, pooled_size=pooled_size, unknown=unknown)
            finish(out, lock)
            return manifest

        return _on_main_process(accelerator, commit)
    finally:
        if lock is not None:
            lock.release()


def _compute_shards(model, source: RowSource, settings: DumpSettings, shards: list[tuple[int, range]],
                    writer: BackgroundShardWriter, bar: tqdm, *, vocab_size: int, layers: list[int], pool,
                    card: FidelityCard, head: OutputHead | None) -> None:
    """This process's share of the work: the teacher runs here, everything after it in `writer`."""
    input_device = model.get_input_embeddings().weight.device
    logprob_dtype = torch.float16 if settings.logprob_dtype == "float16" else torch.float32  # uint8: coded on the host
    started, tokens = time.perf_counter(), 0
    for index, shard in shards:
        writer.begin_shard(index)
        for batches, covered, dropped in windows(source, shard, settings):
            for sample_ids, token_lists, annotations in batches:
                writer.submit(_teacher_targets(model, input_device, sample_ids, token_lists, annotations,
                                               task=source.task, vocab_size=vocab_size, layers=layers, pool=pool,
                                               logprob_dtype=logprob_dtype, card=card, settings=settings,
                                               head=head))
                tokens += sum(len(ids) for ids in token_lists)
            writer.end_window(dropped)
            bar.update(covered)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        writer.end_shard()


def _commit_manifest(out: Path, plan: list[range], settings: DumpSettings, finished_before: set[int],
                     elapsed: float, *, teacher: dict, tokenizer: dict, dataset: dict, layers: list[int],
                     hidden_sizes: dict[int, int], fingerprint: str, num_processes: int,
                     fidelity: FidelityCard, classes: list[str], num_classes: int, optional: tuple[str, ...],
                     pooled_size: int | None, unknown: dict | None) -> Manifest:
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
                           f"committed: rerun with `skip_nonfinite` to commit it without them, or try "
                           f"`dtype` float32 with another `out`")
    dropped: dict[str, list[int]] = {}
    for record in ordered:
        for reason, sample_ids in record.dropped.items():
            dropped.setdefault(reason, []).extend(sample_ids)
    shards = [record.shard for record in ordered if record.shard is not None]
    if not shards:
        reasons = ", ".join(f"{len(ids)} {reason}" for reason, ids in dropped.items())
        raise KDCacheError(f"dataset {dataset['source']} produced no tokens: every row was dropped ({reasons})")
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
        settings=recorded(settings) | {"hidden_layers": layers},
        columns={"targets": list(settings.target_types),
                 **({"codec": settings.stored_codec.to_manifest()} if settings.codec == "compact" else {}),
                 "topk_ids": str(token_id_type(num_classes)), "topk_logprobs": settings.logprob_dtype,
                 "hidden_sizes": {str(layer): size for layer, size in hidden_sizes.items()},
                 "hidden_columns": [hidden_column(layer) for layer in layers]}
                | ({"optional": list(optional)} if optional else {})
                | ({"pooled_size": pooled_size} if pooled_size else {}),
        dump_fingerprint=fingerprint,
        shards=shards,
        stats={"tokens": captured.count, "fidelity": fidelity.summary(),
               **({"captured_mass": captured.summary()} if "topk" in column_groups(settings.target_types) else {}),
               "teacher_nll": round(nll_sum / nll_count, 6) if nll_count else None,
               **({"unknown_tokens": unknown} if unknown is not None else {}),
               "content_sha256": None,  # below: read through the manifest
               "nonfinite_positions": nonfinite_positions, "skipped_sample_ids": nonfinite_ids,
               "dropped_rows": {reason: {"count": len(ids), "sample_ids": sorted(ids)[:LISTED_DROPPED]}
                                for reason, ids in sorted(dropped.items())},
               "num_processes": num_processes, "resumed_shards": len(finished_before),
               "seconds": round(elapsed, 3), "tokens_per_second": round(new_tokens / max(elapsed, 1e-9), 1),
               "shard_stats": {record.shard.file: shard_stats(record.fidelity, record.nll_sum, record.nll_count)
                               for record in ordered if record.shard is not None}},
        kdcache_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        labels=classes,
        format_version=settings.stored_codec.format_version,
    )
    manifest.stats["content_sha256"] = content_sha256(out, manifest, shards)
    write_card(out, manifest)
    manifest.save(out)
    return manifest
