"""`train-student`: train a student from a cache; the teacher is never loaded.

One loop, readable top to bottom (torchtune-style): check the cache and the student, build the
optimizer and schedule, then for each batch compute
`ce_weight·CE + kd_weight·T²·KD + hidden_weight·MSE(proj(student_h), teacher_h)` and step.
Accelerate owns device placement, mixed precision and gradient accumulation. The cache's task
(kdcache/tasks.py) picks the student's model class, its logits at the targets and the gold labels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .batching import Batch
from .cache.format import TARGET_TYPES, Manifest, tokenizer_fingerprint
from .cache.reader import check_shard_files, select_rows, verify_cache
from .cache.store import CacheStore
from .checkpoint import (CHECKPOINTS_DIR, TrainingProgress, latest_checkpoint, list_checkpoints,
                         resolve_checkpoint, save_checkpoint)
from .errors import KDCacheError, require_positive
from .feed import CacheBatches, prefetched
from .losses import SparseTargets, hidden_loss, kd_loss, next_token_ce
from .models import load_model, load_tokenizer, model_from_config
from .tasks import CAUSAL_LM, get_task, pooler
from .validation import check_validation_flags, setup_validation

MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
PROJECTIONS_FILE = "kdcache_projections.pt"
TRAINING_RECORD = "kdcache_training.json"
METRICS_FILE = "metrics.jsonl"
SAMPLE_LOG_ENV = "KDCACHE_SAMPLE_LOG"  # debug: each process appends "epoch sample_id" lines to <value>.rank<N>
# Settings that do not change what is computed: they may differ between a run and its resumption.
OPERATIONAL_SETTINGS = ("log_every", "verify", "save_every", "keep_checkpoints", "prefetch", "read_through")


@dataclasses.dataclass
class TrainSettings:
    temperature: float = 1.0
    ce_weight: float = 0.0
    kd_weight: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    pooled_weight: float = 0.0
    layer_map: str | None = None
    loss: str = "forward_kl"
    tail: str = "rest-bucket"
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    dtype: str = "float32"
    shuffle_buffer: int = 1024
    log_every: int = 10
    verify: bool = True
    targets: str = "topk"             # which cached target type feeds the KD loss: "topk" or "sampled"
    val_fraction: float = 0.0         # held-out share of the cache (by sample id), never trained on
    eval_every: int | None = None     # score the held-out split every N steps (and at the end)
    early_stopping: int | None = None  # stop after this many evaluations without a better val KL
    save_every: int | None = None
    keep_checkpoints: int = 2
    prefetch: int | None = None  # batches a loader worker reads ahead; None: 4 on an accelerator, 0 on CPU
    read_through: str | None = None


def parse_layer_map(spec: str | None, manifest: Manifest, student_layers: int) -> dict[int, int]:
    """`"i:j,..."` → {student hidden_states index: cached teacher layer}; negatives allowed on both sides.

    Without a map, the student's last hidden state is matched to the last cached teacher layer.
    """
    cached = manifest.hidden_layers
    if not cached:
        raise KDCacheError("--hidden-weight > 0 but the cache holds no hidden states (dump with --hidden-layers)")
    if not spec:
        return {student_layers: max(cached)}
    teacher_count = int(manifest.teacher["num_hidden_layers"]) + 1
    mapping = {}
    for pair in spec.split(","):
        try:
            student_index, teacher_index = (int(part) for part in pair.split(":"))
        except ValueError:
            raise KDCacheError(f"--layer-map entry '{pair}' is not 'student:teacher' (e.g. '2:6,4:12')") from None
        if not -(student_layers + 1) <= student_index <= student_layers:
            raise KDCacheError(f"--layer-map student layer {student_index} out of range 0..{student_layers}")
        if teacher_index % teacher_count not in cached or not -teacher_count <= teacher_index < teacher_count:
            raise KDCacheError(f"--layer-map teacher layer {teacher_index} is not cached "
                               f"(cached layers: {', '.join(map(str, cached))})")
        mapping[student_index % (student_layers + 1)] = teacher_index % teacher_count
    return mapping


def check_student_matches_cache(model, student_tokenizer, manifest: Manifest) -> None:
    """Refuse a student whose ids mean something else than the cache's ids."""
    vocab = manifest.vocab_size
    get_task(manifest.task).check_student(model, manifest)
    if student_tokenizer is not None:
        fingerprint = tokenizer_fingerprint(student_tokenizer)
        if fingerprint["hash"] != manifest.tokenizer["hash"]:
            raise KDCacheError(f"student tokenizer ({fingerprint['vocab_size']} tokens) differs from the cache's "
                               f"tokenizer ({vocab} tokens): ids would not line up with the cached targets")


def load_student(student: str | None, student_config: str | None, manifest: Manifest, cache: Path):
    if (student is None) == (student_config is None):
        raise KDCacheError("give exactly one of --student (pretrained) or --student-config (fresh model)")
    if student_config is not None:
        task = get_task(manifest.task)
        model = model_from_config(student_config, manifest.vocab_size, task.auto_class,
                                  **task.student_config_overrides(manifest))
        check_student_matches_cache(model, None, manifest)
        return model
    return load_pretrained_student(student, manifest)


def load_pretrained_student(student: str, manifest: Manifest):
    """Load a pretrained student and check it (and its tokenizer, when it ships one) against the cache."""
    model = load_model(student, "student", "float32", get_task(manifest.task).auto_class)
    has_tokenizer = any((Path(student) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    check_student_matches_cache(model, load_tokenizer(student, "student tokenizer") if has_tokenizer else None, manifest)
    return model


def check_targets(settings: TrainSettings, manifest: Manifest, cache: CacheStore) -> None:
    """Refuse, before any training, a target type the cache lacks or a loss it cannot estimate.

    The loss rules live in `kd_loss`; it is asked on zero positions, so they are stated once.
    """
    if settings.targets not in TARGET_TYPES:
        raise KDCacheError(f"--targets must be one of {', '.join(TARGET_TYPES)}, got {settings.targets!r}")
    if settings.targets not in manifest.target_types:
        remedy = (f"dump with --targets {settings.targets} or both" if manifest.task == CAUSAL_LM
                  else "classification caches hold top-k targets only")
        raise KDCacheError(f"--targets {settings.targets}: cache {cache} holds only {'/'.join(manifest.target_types)} "
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
        raise KDCacheError(f"--targets {settings.targets}: {error}") from None


def _staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _prepare_output(out: Path, resuming: bool) -> Path:
    """Refuse to overwrite; build in `<out>.partial` so a crash never leaves a half-saved model.

    The staging directory also holds the run's checkpoints: it is kept when resuming and never
    silently wiped while it holds checkpoints.
    """
    if out.exists() and any(out.iterdir()):
        raise KDCacheError(f"output directory {out} exists and is not empty")
    staging = _staging_dir(out)
    if not resuming:
        if list_checkpoints(staging / CHECKPOINTS_DIR):
            raise KDCacheError(f"{staging} holds checkpoints of an interrupted run: pass --resume to continue it "
                               f"or delete it to start over")
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def _checkpoint_to_resume(out: Path, resume: bool, resume_from: str | Path | None) -> Path | None:
    """`--resume-from CKPT`, else with `--resume` the latest checkpoint in `<out>.partial` (None: start fresh)."""
    if resume_from is not None:
        return resolve_checkpoint(Path(resume_from))
    if resume and out.exists() and any(out.iterdir()):
        raise KDCacheError(f"nothing to resume: {out} holds a finished run")
    return latest_checkpoint(_staging_dir(out) / CHECKPOINTS_DIR) if resume else None


class FeatureProjections(nn.Module):
    """One learned linear map per matched layer pair (and for the pooled output) when widths differ (FitNets);
    identity otherwise."""

    def __init__(self, layer_map: dict[int, int], student_width: int, teacher_sizes: dict[int, int],
                 kind: str = "mse", pooled_size: int | None = None):
        super().__init__()
        self.layer_map = layer_map
        self.kind = kind
        self.pooled = (None if pooled_size is None else
                       nn.Identity() if pooled_size == student_width else nn.Linear(student_width, pooled_size))
        self.maps = nn.ModuleDict({
            str(student_layer): (nn.Identity() if teacher_sizes[teacher_layer] == student_width
                                 else nn.Linear(student_width, teacher_sizes[teacher_layer]))
            for student_layer, teacher_layer in layer_map.items()})

    def forward(self, student_hidden: tuple[torch.Tensor, ...] | None, student_pooled: torch.Tensor | None,
                batch: Batch) -> dict[str, torch.Tensor]:
        """The feature-matching loss terms ("hidden", "pooled") this module is set up for.

        The losses are computed in `forward` so that, under several processes, the call goes through
        DistributedDataParallel, which then averages the projections' gradients across processes.
        """
        terms = {}
        if self.layer_map:
            valid = batch.valid
            terms["hidden"] = torch.stack([
                hidden_loss(self.maps[str(s)](student_hidden[s][valid].float()), batch.hidden[t][valid], self.kind)
                for s, t in self.layer_map.items()]).mean()
        if self.pooled is not None:
            terms["pooled"] = hidden_loss(self.pooled(student_pooled.float()), batch.pooled, self.kind)
        return terms


class MetricsLog:
    """Averages each loss term over the micro-batches since the last flush; writes JSONL lines."""

    def __init__(self, path: Path | None, num_processes: int):
        self.file = open(path, "a") if path else None  # a fresh file, or a resumed run's (see load_state_dict)
        self.num_processes = num_processes
        self.started = time.perf_counter()
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.last: dict = {}

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], tokens: int) -> None:
        self.tokens += tokens
        self.micro += 1
        for name, value in {"loss": loss, **terms}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().item()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, str]:
        """Write one record if anything was added since the last; return a progress-bar postfix."""
        if self.micro:
            self.last = {"step": step, "epoch": epoch, "lr": lr,
                         **{name: total / self.micro for name, total in self.sums.items()}, "tokens": self.tokens,
                         "tokens_per_second": self.tokens * self.num_processes / self.elapsed()}
            if self.file:
                self.file.write(json.dumps(self.last) + "\n")
                self.file.flush()
            self.sums, self.micro = {}, 0
        return {"loss": f"{self.last.get('loss', float('nan')):.4f}",
                "tok_s": f"{self.last.get('tokens_per_second', 0):.0f}"}

    def write(self, record: dict) -> None:
        """Write a record of another kind (e.g. a validation score) as its own JSONL line."""
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "elapsed": self.elapsed(), "sums": dict(self.sums), "micro": self.micro,
                "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint (its metrics.jsonl is restored by the caller)."""
        self.tokens, self.sums, self.micro, self.last = state["tokens"], dict(state["sums"]), state["micro"], state["last"]
        self.started = time.perf_counter() - state["elapsed"]

    def close(self) -> None:
        if self.file:
            self.file.close()


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
    store, out = CacheStore(cache, settings.read_through), Path(out)
    manifest = store.load_manifest()
    require_positive(settings, "batch_size", "grad_accum", "temperature", "keep_checkpoints", "max_steps", "save_every")
    checkpoint = _checkpoint_to_resume(out, resume, resume_from)
    check_targets(settings, manifest, store)
    check_validation_flags(fraction=settings.val_fraction, every=settings.eval_every, patience=settings.early_stopping)
    task = get_task(manifest.task)
    if settings.hidden_loss not in ("mse", "cosine"):
        raise KDCacheError(f"--hidden-loss must be 'mse' or 'cosine', got '{settings.hidden_loss}'")
    if settings.ce_weight:
        task.check_gold_labels(manifest)
    if settings.pooled_weight and manifest.pooled_size is None:
        raise KDCacheError("--pooled-weight > 0 but the cache holds no pooled output (dump with --pooled)")
    if settings.verify:
        verify_cache(store, manifest, progress=progress)
    else:
        check_shard_files(store, manifest)
    tokenizer = load_tokenizer(str(store.tokenizer_dir()), "cache tokenizer")
    train_ids, validation = setup_validation(store, manifest, fraction=settings.val_fraction,
                                             every=settings.eval_every, patience=settings.early_stopping,
                                             batch_size=settings.batch_size)
    kept_rows = None if train_ids is None else select_rows(store, manifest, train_ids)

    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[settings.dtype],
                              gradient_accumulation_steps=settings.grad_accum)
    set_seed(settings.seed)
    model = load_student(student, student_config, manifest, store)
    model.config.use_cache = False
    layer_map = (parse_layer_map(settings.layer_map, manifest, model.config.num_hidden_layers)
                 if settings.hidden_weight > 0 else {})
    student_pooler = pooler(model) if settings.pooled_weight else None
    projections = FeatureProjections(layer_map, model.config.hidden_size, manifest.hidden_sizes, settings.hidden_loss,
                                     manifest.pooled_size if settings.pooled_weight else None)
    staging = _staging_dir(out)
    if accelerator.is_main_process:
        _prepare_output(out, resuming=checkpoint is not None)
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
    metrics = MetricsLog(staging / METRICS_FILE if accelerator.is_main_process else None, accelerator.num_processes)
    state = TrainingProgress(_run_identity(manifest, settings, accelerator.num_processes))
    accelerator.register_for_checkpointing(state)
    if validation:  # its best score, patience counter and best-state snapshot are part of each checkpoint
        accelerator.register_for_checkpointing(validation)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
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
    if accelerator.is_main_process:
        metrics.close()
        accelerator.unwrap_model(model).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if layer_map or student_pooler is not None:
            torch.save(accelerator.unwrap_model(projections).state_dict(), staging / PROJECTIONS_FILE)
        record = {"cache": str(store), "dump_fingerprint": manifest.dump_fingerprint,
                  "student": student or student_config, "settings": dataclasses.asdict(settings),
                  "layer_map": {str(s): t for s, t in layer_map.items()}, "summary": summary}
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    return summary


def _run_identity(manifest: Manifest, settings: TrainSettings, num_processes: int) -> dict:
    """What a resumed run must share with the checkpoint to reproduce the uninterrupted run."""
    trajectory = {name: value for name, value in dataclasses.asdict(settings).items() if name not in OPERATIONAL_SETTINGS}
    return {"dump_fingerprint": manifest.dump_fingerprint, "num_processes": num_processes, **trajectory}


def _open_sample_log(process_index: int):
    """With $KDCACHE_SAMPLE_LOG set, a file recording which sample ids this process trained on, per epoch."""
    prefix = os.environ.get(SAMPLE_LOG_ENV)
    return open(f"{prefix}.rank{process_index}", "a") if prefix else None
