"""Bring your own loop: a cache as a torch dataset, a collator, and a Hugging Face `Trainer`.

`train-student` is one loop; users who already have one (HF Trainer, TRL, Lightning, their own)
need only three pieces, all sharing `train-student`'s code so the numbers agree:

- `CacheDataset`: the cache's rows as a torch `IterableDataset`, in `train-student`'s order
  (seeded shuffle per epoch, equal shares per process);
- `collate` (batching.py) turns rows into a `Batch` — `batch.model_inputs()`,
  `batch.sparse_targets()` for `kd_loss`, `batch.hidden` — and `collate_inputs` gives the same as
  the dict a `Trainer` moves to its device;
- `DistillationTrainer`: a `transformers.Trainer` whose `compute_loss` is `DistillationLoss`,
  the very function `train-student` calls on each batch; without `args` it trains with
  `training_arguments`, `train-student`'s recipe (the same defaults, resolved for the student).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import IterableDataset, get_worker_info

from ..cache.cache import Cache, as_cache
from ..cache.writer import CachedSequence
from ..errors import KDCacheError
from .batching import Batch, collate
from .defaults import resolve_defaults
from .loading import check_student_matches_cache
from .objective import DistillationLoss
from .settings import TrainSettings


class CacheDataset(IterableDataset):
    """The sequences of `cache` (a `Cache`, path or URL), one epoch per iteration, as `CachedSequence`s.

    The order is `Cache.sequences`': shuffled by `seed` and the epoch (a `Trainer` calls `set_epoch`),
    so with the same seed and batch size the batches are `train-student`'s. Under a `Trainer`, keep
    one process's view (the default): Accelerate dispatches an iterable dataset's batches to the
    processes itself. In a loop of your own with several processes, pass `process_index` and
    `num_processes` for equal, disjoint shares. `hidden_layers` picks the cached hidden states to decode;
    `teachers` names other teachers of a multi-teacher cache whose targets each row carries along (the
    batches of a `teachers` mixture need them: `DistillationLoss.other_teachers`).
    """

    def __init__(self, cache: Cache | str | Path, *, hidden_layers: Sequence[int] = (), shuffle: bool = True,
                 seed: int = 0, shuffle_buffer: int = 1024, process_index: int = 0, num_processes: int = 1,
                 teachers: Sequence[str] = ()):
        self.cache = as_cache(cache)
        self.hidden_layers = list(hidden_layers)
        self.teachers = tuple(teachers)
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Sequences per epoch for this process (every process gets the same number)."""
        return len(self.cache) // self.num_processes

    def __iter__(self) -> Iterator[CachedSequence]:
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise KDCacheError("CacheDataset is read by one loader worker (dataloader_num_workers <= 1): "
                               "each extra worker would repeat the same rows")
        return self.cache.sequences(hidden_layers=self.hidden_layers, shuffle=self.shuffle, seed=self.seed,
                                    epoch=self.epoch, shuffle_buffer=self.shuffle_buffer,
                                    process_index=self.process_index, num_processes=self.num_processes,
                                    teachers=self.teachers)


def collate_inputs(sequences: list[CachedSequence]) -> dict[str, Any]:
    """`collate(sequences).as_dict()`: a `Trainer` collator; `Batch(**inputs)` rebuilds the batch."""
    return collate(sequences).as_dict()


def training_arguments(model: torch.nn.Module, settings: TrainSettings = TrainSettings(),
                       output_dir: str = "trainer_output", **overrides: Any) -> transformers.TrainingArguments:
    """`TrainingArguments` that train `model` with `train-student`'s recipe for `settings`: the peak learning
    rate (its default resolved for `model` by `resolve_defaults`), the warm-up share and cosine decay, AdamW's
    weight decay, gradient clipping, batch size, accumulation, steps or epochs and seed. `overrides` (e.g.
    `logging_steps`, `save_strategy`) are passed on; they win over the recipe."""
    settings, _ = resolve_defaults(settings, model)
    # train-student warms up for int(warmup_ratio · steps) steps; a ratio given to the Trainer rounds up instead,
    # so with known steps the count is passed (an epoch-long run's steps are only known to the Trainer)
    warmup = int(settings.warmup_ratio * settings.max_steps) if settings.max_steps else settings.warmup_ratio
    recipe = {"output_dir": output_dir, "learning_rate": settings.lr, "lr_scheduler_type": "cosine",
              "warmup_steps": warmup, "weight_decay": settings.weight_decay,
              "max_grad_norm": settings.max_grad_norm, "per_device_train_batch_size": settings.batch_size,
              "gradient_accumulation_steps": settings.grad_accum, "max_steps": settings.max_steps or -1,
              "num_train_epochs": settings.epochs or 1, "seed": settings.seed,
              "remove_unused_columns": False}  # the collator needs every cached column
    return transformers.TrainingArguments(**(recipe | overrides))


class DistillationTrainer(transformers.Trainer):
    """A `transformers.Trainer` that trains `model` on `cache` with `train-student`'s loss.

        trainer = DistillationTrainer(model=student, args=TrainingArguments("out", max_steps=100),
                                      cache=kdcache.open_cache("cache/"), settings=TrainSettings(ce_weight=0.5))
        trainer.train()

    The loss is `DistillationLoss(settings, cache, model)`, the function `train-student` calls, so the
    same weights and batch give the same number. Of `settings`, the loss fields (weights, divergence,
    tail, temperature, targets, layer map, `teachers`: a multi-teacher cache's mixture, its rows read along,
    `fused_loss`: a causal LM's CE and KD from its final hidden states, never its full logits; kdcache/fused.py)
    and the data order (`seed`, `shuffle_buffer`) apply; the
    optimizer, schedule, batch size and steps are the `TrainingArguments`', and without `args` they are
    `training_arguments(model, settings)`: `train-student`'s, with the same defaults. Learned feature
    projections (a student narrower than the cached hidden states) are trained with the model but
    not saved by `save_model`: they live in `trainer.distillation_loss.projections`.
    `evaluate()` reports the same loss on an `eval_dataset` (e.g. `CacheDataset(cache.subset(...), shuffle=False)`);
    `kdcache.evaluate` gives the KL/agreement scores.
    """

    # The loss is a per-batch mean, as in train-student: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: torch.nn.Module, args: transformers.TrainingArguments | None = None, *,
                 cache: Cache | str | Path, settings: TrainSettings = TrainSettings(), **kwargs):
        cache = as_cache(cache)
        if settings.student_tokenizer:
            raise KDCacheError("`student_tokenizer` (training across tokenizers) is supported by train_student, "
                               "not yet by DistillationTrainer")
        check_student_matches_cache(model, None, cache.manifest)
        self.distillation_loss = DistillationLoss(settings, cache, model)
        loss = self.distillation_loss
        kwargs.setdefault("train_dataset", CacheDataset(cache, hidden_layers=loss.teacher_layers, seed=settings.seed,
                                                        shuffle_buffer=settings.shuffle_buffer,
                                                        teachers=loss.other_teachers))
        kwargs.setdefault("data_collator", collate_inputs)
        super().__init__(model=model, args=args or training_arguments(model, settings), **kwargs)
        projections = self.distillation_loss.projections
        if self.args.world_size > 1 and any(True for _ in projections.parameters()):
            raise KDCacheError("learned feature projections are not synchronised across processes under "
                               "DistillationTrainer: match equal widths or use train_student")
        projections.to(self.args.device)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the feature projections' parameters (trained with the student)."""
        optimizer = super().create_optimizer(model)
        extra = list(self.distillation_loss.projections.parameters())
        known = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
        if extra and id(extra[0]) not in known:
            optimizer.add_param_group({"params": extra, "weight_decay": self.args.weight_decay})
        return optimizer

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """`DistillationLoss` of the batch; `num_items_in_batch` is unused (the loss is a per-batch mean)."""
        loss, terms = self.distillation_loss(model, Batch(**inputs))
        return (loss, terms) if return_outputs else loss

    def prediction_step(self, model, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation reports the training loss on held-out batches; predictions are `kdcache.evaluate`'s job."""
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None
