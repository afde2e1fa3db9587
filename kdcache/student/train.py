"""`train-student`: train a student from a cache; the teacher is never loaded.

One loop, readable top to bottom (torchtune-style): check the cache and the student, build the
optimizer and schedule, then for each batch compute
`ce_weight·CE + kd_weight·T²·KD + hidden_weight·MSE(proj(student_h), teacher_h)` and step.
Accelerate owns device placement, mixed precision and gradient accumulation. The cache's task
(kdcache/tasks/) picks the student's model class, its logits at the targets and the gold labels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..cache.format import Manifest
from ..cache.reader import check_shard_files, select_rows, verify_cache
from ..cache.store import CacheStore
from ..errors import KDCacheError
from ..losses import SparseTargets, kd_loss, next_token_ce
from ..tasks import CAUSAL_LM, get_task, pooler
from .batching import Batch
from .checkpoint import CHECKPOINTS_DIR, TrainingProgress, load_checkpoint, register_safe_state, save_checkpoint
from .feed import CacheBatches, prefetched
from .loading import load_cache_tokenizer, load_student
from .metrics import LOG_DIR, RUN_NAME, MetricsLog, tracker_config, trackers
from .output import checkpoint_to_resume, commit_output, prepare_output, staging_dir
from .projections import FeatureProjections, parse_layer_map
from .settings import OPERATIONAL_SETTINGS, TrainSettings
from .validation import setup_validation

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
PROJECTIONS_FILE = "kdcache_projections.pt"
TRAINING_RECORD = "kdcache_training.json"
METRICS_FILE = "metrics.jsonl"
SAMPLE_LOG_ENV = "KDCACHE_SAMPLE_LOG"  # debug: each process appends "epoch sample_id" lines to <value>.rank<N>


def check_targets(settings: TrainSettings, manifest: Manifest, cache: CacheStore) -> None:
    """Refuse, before any training, a target type the cache lacks or a loss it cannot estimate.

    The loss rules live in `kd_loss`; it is asked on zero positions, so they are stated once.
    """
    if settings.targets not in manifest.target_types:
        remedy = (f"dump with `targets` {settings.targets} or both" if manifest.task == CAUSAL_LM
                  else "classification caches hold top-k targets only")
        raise KDCacheError(f"`targets` {settings.targets}: cache {cache} holds only {'/'.join(manifest.target_types)} "
                           f"targets ({remedy})")
    if not settings.kd_weight:
        return
    sampled = settings.targets == "sampled"
    probe = SparseTargets(ids=torch.zeros(0, 1, dtype=torch.long), logprobs=torch.zeros(0, 1),
                          tail_logprob=None if sampled else torch.zeros(0))
    try:
        kd_loss(torch.zeros(0, manifest.num_classes), probe, divergence=settings.loss, tail=settings.tail,
                temperature=settings.temperature)
    except ValueError as error:
        raise KDCacheError(f"`targets` {settings.targets}: {error}") from None


def _batches(store: CacheStore, manifest: Manifest, settings: TrainSettings, accelerator: Accelerator,
             hidden_layers: list[int], kept_rows: list[np.ndarray] | None, start_epoch: int = 0,
             start_batch: int = 0) -> Iterable[tuple[int, int, Batch]]:
    """(epoch, batches of the epoch consumed so far, batch) forever or for `settings.epochs` epochs,
    starting after `start_batch` batches of `start_epoch` (a resumed run); only `kept_rows` if given."""
    batches = CacheBatches(store, manifest, batch_size=settings.batch_size, seed=settings.seed,
                           shuffle_buffer=settings.shuffle_buffer, process_index=accelerator.process_index,
                           num_processes=accelerator.num_processes, hidden_layers=hidden_layers,
                           kept_rows=kept_rows, start_epoch=start_epoch, start_batch=start_batch,
                           epochs=settings.epochs)
    return prefetched(batches, _prefetch(settings, accelerator))


def _prefetch(settings: TrainSettings, accelerator: Accelerator) -> int:
    """On CPU the student's compute already uses every core: a reader process would compete with it
    (and make OpenMP threads spin), while reading in-process costs ~1% of a step (tools/bench_train.py)."""
    if settings.prefetch is not None:
        return settings.prefetch
    return 0 if accelerator.device.type == "cpu" else 4


def _total_steps(training_rows: int, settings: TrainSettings, num_processes: int) -> int:
    rows = training_rows // num_processes
    per_epoch = math.ceil(math.ceil(rows / settings.batch_size) / settings.grad_accum)
    by_epochs = per_epoch * (settings.epochs or 1)
    return min(settings.max_steps, by_epochs) if settings.epochs and settings.max_steps else (settings.max_steps or by_epochs)


def train_student(cache: Path | str, out: Path | str, *, student: str | None = None,
                  student_config: str | None = None, settings: TrainSettings = TrainSettings(),
                  progress: bool = True, resume: bool = False, resume_from: Path | str | None = None) -> dict:
    """Train a student on the cache at `cache` (a directory or an fsspec URL), save it to `out`; return the
    final metrics. With `resume`, continue from the latest checkpoint in `<out>.partial/checkpoints` if
    there is one; `resume_from` names a checkpoint directory explicitly."""
    store, out = CacheStore(cache, settings.read_through, settings.transfer_timeout), Path(out)
    manifest = store.load_manifest()
    checkpoint = checkpoint_to_resume(out, resume, resume_from)
    check_targets(settings, manifest, store)
    task = get_task(manifest.task)
    if settings.ce_weight:
        task.check_gold_labels(manifest)
    if settings.pooled_weight and manifest.pooled_size is None:
        raise KDCacheError("`pooled_weight` > 0 but the cache holds no pooled output (dump with `pooled`)")
    if settings.verify:
        verify_cache(store, manifest, progress=progress)
    else:
        check_shard_files(store, manifest)
    tokenizer = load_cache_tokenizer(store, manifest)
    train_ids, validation = setup_validation(store, manifest, fraction=settings.val_fraction,
                                             every=settings.eval_every, patience=settings.early_stopping,
                                             batch_size=settings.batch_size)
    kept_rows = None if train_ids is None else select_rows(store, manifest, train_ids)

    report_to = trackers(settings.report_to)
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[settings.dtype],
                              gradient_accumulation_steps=settings.grad_accum, log_with=report_to or None,
                              project_dir=str(staging_dir(out) / LOG_DIR))
    set_seed(settings.seed)
    model = load_student(student, student_config, manifest, store)
    model.config.use_cache = False
    layer_map = (parse_layer_map(settings.layer_map, manifest, model.config.num_hidden_layers)
                 if settings.hidden_weight > 0 else {})
    student_pooler = pooler(model) if settings.pooled_weight else None
    projections = FeatureProjections(layer_map, model.config.hidden_size, manifest.hidden_sizes, settings.hidden_loss,
                                     manifest.pooled_size if settings.pooled_weight else None)
    staging = staging_dir(out)
    if accelerator.is_main_process:
        prepare_output(out, resuming=checkpoint is not None)
        if checkpoint is not None and (checkpoint / METRICS_FILE).is_file():
            shutil.copyfile(checkpoint / METRICS_FILE, staging / METRICS_FILE)
    accelerator.wait_for_everyone()

    training_rows = manifest.total_rows if train_ids is None else len(train_ids)
    total_steps = _total_steps(training_rows, settings, accelerator.num_processes)
    parameters = list(model.parameters()) + list(projections.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if any(True for _ in projections.parameters()):  # DDP refuses a module with no parameters
        projections = accelerator.prepare(projections)
    model.train()

    vocab = manifest.num_classes
    if report_to:
        accelerator.init_trackers(RUN_NAME, config=tracker_config(dataclasses.asdict(settings)))
    metrics = MetricsLog(staging / METRICS_FILE if accelerator.is_main_process else None, accelerator.num_processes,
                         tracker=(lambda values, step: accelerator.log(values, step=step)) if report_to else None)
    state = TrainingProgress(_run_identity(manifest, settings, accelerator.num_processes))
    # the validation's best score, patience counter and best-state snapshot are part of each checkpoint
    register_safe_state(accelerator, {"progress": state, **({"validation": validation} if validation else {})})
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint)
        metrics.load_state_dict(state.metrics)
    sample_log = _open_sample_log(accelerator.process_index)
    bar = tqdm(total=total_steps, initial=state.step, desc="train-student", unit="step",
               disable=not (progress and accelerator.is_main_process))
    step, epoch = state.step, state.epoch
    # What validation scores, snapshots when best and restores before saving.
    trained = {"model": accelerator.unwrap_model(model), "projections": accelerator.unwrap_model(projections)}
    for epoch, consumed, batch in _batches(store, manifest, settings, accelerator, sorted(set(layer_map.values())),
                                           kept_rows, start_epoch=state.epoch, start_batch=state.batches_in_epoch):
        if sample_log:
            sample_log.write("".join(f"{epoch} {sample_id}\n" for sample_id in batch.sample_ids))
        batch = batch.to(accelerator.device)
        with accelerator.accumulate(model, projections):
            output = model(**batch.model_inputs(), output_hidden_states=bool(layer_map) or bool(student_pooler))
            logits = task.student_logits(output.logits, batch, vocab)
            terms = {}
            if settings.ce_weight:
                terms["ce"] = next_token_ce(logits, task.gold_labels(batch))
            if settings.kd_weight:
                terms["kd"] = kd_loss(logits, batch.sparse_targets(settings.targets), divergence=settings.loss,
                                      tail=settings.tail, temperature=settings.temperature)
            if layer_map or student_pooler is not None:
                pooled = student_pooler(output.hidden_states[-1]) if student_pooler is not None else None
                terms |= projections(output.hidden_states, pooled, batch)
            weights = {"ce": settings.ce_weight, "kd": settings.kd_weight, "hidden": settings.hidden_weight,
                       "pooled": settings.pooled_weight}
            loss = sum(weights[name] * value for name, value in terms.items())
            accelerator.backward(loss)
            if accelerator.sync_gradients and settings.max_grad_norm:
                accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        metrics.add(loss, terms, batch.num_tokens)
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        if step % settings.log_every == 0 or step == total_steps:
            bar.set_postfix(metrics.flush(step, epoch, scheduler.get_last_lr()[0]))
        if validation and validation.due(step, total_steps):
            metrics.write(validation.run(trained, step))
            if validation.should_stop:
                break
        if step >= total_steps:
            break
        if settings.save_every and step % settings.save_every == 0:
            state.step, state.epoch, state.batches_in_epoch, state.metrics = step, epoch, consumed, metrics.state_dict()
            save_checkpoint(accelerator, staging / CHECKPOINTS_DIR, step, settings.keep_checkpoints,
                            staging / METRICS_FILE)
    bar.close()
    if sample_log:
        sample_log.close()
    if step == 0:
        raise KDCacheError("no optimizer step was taken: the cache has fewer rows than processes")
    metrics.flush(step, epoch, scheduler.get_last_lr()[0])
    if validation:
        if step != validation.last.get("step"):  # the data ran out before total_steps
            metrics.write(validation.run(trained, step))
        validation.restore_best(trained)

    accelerator.wait_for_everyone()
    summary = {"steps": step, "epochs_started": epoch + 1, "tokens": metrics.tokens,
               "seconds": round(metrics.elapsed(), 3), "final": metrics.last,
               **({"validation": validation.summary()} if validation else {})}
    accelerator.end_training()  # closes the trackers' files before the output directory is renamed
    if accelerator.is_main_process:
        metrics.close()

        def save(staging: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if layer_map or student_pooler is not None:
                torch.save(accelerator.unwrap_model(projections).state_dict(), staging / PROJECTIONS_FILE)
            record = {"cache": str(store), "dump_fingerprint": manifest.dump_fingerprint,
                      "student": student or student_config, "settings": dataclasses.asdict(settings),
                      "layer_map": {str(s): t for s, t in layer_map.items()}, "summary": summary}
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        commit_output(out, save)
    return summary


def _run_identity(manifest: Manifest, settings: TrainSettings, num_processes: int) -> dict:
    """What a resumed run must share with the checkpoint to reproduce the uninterrupted run."""
    trajectory = {name: value for name, value in dataclasses.asdict(settings).items() if name not in OPERATIONAL_SETTINGS}
    return {"dump_fingerprint": manifest.dump_fingerprint, "num_processes": num_processes, **trajectory}


def _open_sample_log(process_index: int):
    """With $KDCACHE_SAMPLE_LOG set, a file recording which sample ids this process trained on, per epoch."""
    prefix = os.environ.get(SAMPLE_LOG_ENV)
    return open(f"{prefix}.rank{process_index}", "a") if prefix else None
