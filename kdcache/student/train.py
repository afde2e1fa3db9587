"""`train-student`: train a student from a cache; the teacher is never loaded.

One loop, readable top to bottom (torchtune-style): check the cache and the student, build the
optimizer and schedule, then for each batch compute the `DistillationLoss` (objective.py:
`ce_weight·CE + kd_weight·T²·KD + hidden_weight·MSE(proj(student_h), teacher_h)`) and step.
Accelerate owns device placement, mixed precision and gradient accumulation. The cache's task
(kdcache/tasks/) picks the student's model class, its logits at the targets and the gold labels.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..cache.cache import Cache, open_cache
from ..cache.format import Manifest
from ..errors import KDCacheError
from ..plots import CURVES_FILE, plots_available, write_training_curves
from ..settings import applies_threads, recorded
from ..sources import check_student_sources
from .batching import Batch
from .checkpoint import CHECKPOINTS_DIR, TrainingProgress, load_checkpoint, register_safe_state, save_checkpoint
from .defaults import resolve_defaults
from .feed import CacheBatches, prefetched
from .hooks import TrainHooks
from .loading import load_cache_tokenizer, load_student
from .metrics import LOG_DIR, RUN_NAME, MetricsLog, tracker_config, trackers
from .objective import DistillationLoss, check_loss_settings
from .output import TRAINING_RECORD, check_output, checkpoint_to_resume, commit_output, prepare_output, staging_dir
from .settings import OPERATIONAL_SETTINGS, TrainSettings
from .validation import setup_validation
from .watch import TrainingWatch

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
PROJECTIONS_FILE = "kdcache_projections.pt"
METRICS_FILE = "metrics.jsonl"
ALIGNMENT_REPORT_ROWS = 1000  # rows the cross-tokenizer alignment statistics are measured on


def _batches(cache: Cache, settings: TrainSettings, accelerator: Accelerator, loss_of: DistillationLoss,
             start_epoch: int = 0, start_batch: int = 0) -> Iterable[tuple[int, int, Batch]]:
    """(epoch, batches of the epoch consumed so far, batch) forever or for `settings.epochs` epochs,
    starting after `start_batch` batches of `start_epoch` (a resumed run), from `cache` (maybe a subset)."""
    batches = CacheBatches(cache, batch_size=settings.batch_size, seed=settings.seed,
                           shuffle_buffer=settings.shuffle_buffer, process_index=accelerator.process_index,
                           num_processes=accelerator.num_processes, hidden_layers=loss_of.teacher_layers,
                           start_epoch=start_epoch, start_batch=start_batch, epochs=settings.epochs,
                           teachers=loss_of.other_teachers,
                           **({} if loss_of.cross is None else {"collate": loss_of.cross.collate}))
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


@applies_threads
def train_student(cache: Cache | Path | str, out: Path | str, *, student: str | None = None,
                  student_config: str | None = None, settings: TrainSettings = TrainSettings(),
                  progress: bool = True, resume: bool = False, resume_from: Path | str | None = None,
                  overwrite: bool = False, hooks: TrainHooks = TrainHooks()) -> dict:
    """Train a student on `cache` (a `Cache`, a directory or an fsspec URL), save it to `out`; return the
    final metrics. With `resume`, continue from the latest checkpoint in `<out>.partial/checkpoints` if
    there is one; `resume_from` names a checkpoint directory explicitly. With `overwrite`, a student kdcache
    wrote to `out` earlier is replaced once the new one is complete. `hooks` watch or stop the loop."""
    check_student_sources(student, student_config)
    cache = cache if isinstance(cache, Cache) else open_cache(cache, settings.read_through,
                                                              transfer_timeout=settings.transfer_timeout)
    out = Path(out)
    manifest = cache.manifest
    checkpoint = checkpoint_to_resume(out, resume, resume_from)
    if checkpoint is None:
        check_output(out, overwrite)
    check_loss_settings(settings, cache)  # before the (long) verification; DistillationLoss checks again
    if settings.verify:
        cache.verify(progress=progress)
    else:
        cache.check_files()
    train_ids, validation = setup_validation(cache, fraction=settings.val_fraction, every=settings.eval_every,
                                             patience=settings.early_stopping, batch_size=settings.batch_size,
                                             evaluate=hooks.evaluate)
    training = cache if train_ids is None else cache.subset(train_ids)

    report_to = trackers(settings.report_to)
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[settings.dtype],
                              gradient_accumulation_steps=settings.grad_accum, log_with=report_to or None,
                              project_dir=str(staging_dir(out) / LOG_DIR))
    set_seed(settings.seed)
    # The cache's tokenizer is checked (its real size against the manifest's) before a model is sized by the manifest.
    cache_tokenizer = None if settings.student_tokenizer else load_cache_tokenizer(cache)
    model = load_student(student, student_config, manifest, settings.student_tokenizer)
    model.config.use_cache = False
    settings, defaults = resolve_defaults(settings, model)
    if progress:
        for line in defaults.values():
            accelerator.print(line)
    loss_of = DistillationLoss(settings, cache, model)
    # The student ships the tokenizer it was trained with: the cache's, or its own across tokenizers.
    tokenizer = cache_tokenizer if loss_of.cross is None else loss_of.cross.student_tokenizer
    # Across tokenizers: the share of student positions that get a target, and of the mass that maps exactly.
    alignment = (None if loss_of.cross is None
                 else loss_of.cross.report(itertools.islice(training.sequences(), ALIGNMENT_REPORT_ROWS)))
    staging = staging_dir(out)
    if accelerator.is_main_process:
        prepare_output(out, resuming=checkpoint is not None, overwrite=overwrite)
        if checkpoint is not None and (checkpoint / METRICS_FILE).is_file():
            shutil.copyfile(checkpoint / METRICS_FILE, staging / METRICS_FILE)
    accelerator.wait_for_everyone()

    total_steps = _total_steps(len(training), settings, accelerator.num_processes)
    parameters = list(model.parameters()) + list(loss_of.projections.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup_steps = int(settings.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if any(True for _ in loss_of.projections.parameters()):  # DDP refuses a module with no parameters
        loss_of.projections = accelerator.prepare(loss_of.projections)
    model.train()

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
    resumed_step = state.step
    bar = tqdm(total=total_steps, initial=state.step, desc="train-student", unit="step",
               disable=not (progress and accelerator.is_main_process))
    step, epoch = state.step, state.epoch
    watch = TrainingWatch(total_steps=total_steps, warmup_steps=warmup_steps, lr=settings.lr, tokenizer=tokenizer,
                          uses_targets=settings.kd_weight > 0, start_step=step, enabled=accelerator.is_main_process)
    # What validation scores, snapshots when best and restores before saving.
    trained = {"model": accelerator.unwrap_model(model),
               "projections": accelerator.unwrap_model(loss_of.projections)}
    for epoch, consumed, batch in _batches(training, settings, accelerator, loss_of,
                                           start_epoch=state.epoch, start_batch=state.batches_in_epoch):
        if hooks.on_batch:
            hooks.on_batch(epoch, list(batch.sample_ids))
        watch.batch(batch)
        batch = batch.to(accelerator.device)
        with accelerator.accumulate(model, loss_of.projections):
            loss, terms = loss_of(model, batch)
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
        stop = bool(hooks.on_step and hooks.on_step(step, metrics.tokens))
        if step % settings.log_every == 0 or step == total_steps:
            bar.set_postfix(metrics.flush(step, epoch, scheduler.get_last_lr()[0]))
            watch.logged(metrics.last)
        if validation and validation.due(step, total_steps):
            metrics.write(validation.run(trained, step))
            if validation.should_stop:
                break
        if step >= total_steps or stop:
            break
        if settings.save_every and step % settings.save_every == 0:
            state.step, state.epoch, state.batches_in_epoch, state.metrics = step, epoch, consumed, metrics.state_dict()
            saved = save_checkpoint(accelerator, staging / CHECKPOINTS_DIR, step, settings.keep_checkpoints,
                                    staging / METRICS_FILE)
            if hooks.after_checkpoint:
                hooks.after_checkpoint(step, saved)
    bar.close()
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
               **({"defaults": defaults} if defaults else {}),
               **({"validation": validation.summary()} if validation else {}),
               **({"cross_tokenizer": alignment} if alignment else {}),
               **({"resumed_from": str(checkpoint), "resumed_from_step": resumed_step} if checkpoint else {})}
    accelerator.end_training()  # closes the trackers' files before the output directory is renamed
    if accelerator.is_main_process:
        metrics.close()

        def save(staging: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if loss_of.matches_features:
                torch.save(accelerator.unwrap_model(loss_of.projections).state_dict(), staging / PROJECTIONS_FILE)
            record = {"cache": str(cache), "dump_fingerprint": manifest.dump_fingerprint,
                      "student": student or student_config, "settings": recorded(settings),
                      "layer_map": {str(s): t for s, t in loss_of.layer_map.items()}, "summary": summary}
            (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            if plots_available():  # an optional extra: a run never fails for a missing picture (the CLI says so)
                write_training_curves(staging / METRICS_FILE, staging / CURVES_FILE)
        commit_output(out, save)
    return summary


def _run_identity(manifest: Manifest, settings: TrainSettings, num_processes: int) -> dict:
    """What a resumed run must share with the checkpoint to reproduce the uninterrupted run."""
    trajectory = {name: value for name, value in dataclasses.asdict(settings).items() if name not in OPERATIONAL_SETTINGS}
    return {"dump_fingerprint": manifest.dump_fingerprint, "num_processes": num_processes, **trajectory}

