"""Explicit seams into `train_student`'s loop: watch it, stop it, or score validation your own way.

Monitoring, benchmarks and tests need to see inside the loop (which rows a process trained on,
how fast steps go, when a checkpoint landed) or to end it early; patching the loop's modules for
that breaks whenever a function moves. These hooks are the supported way instead. Every hook is
optional and runs on every process. An exception a hook raises propagates out of `train_student`
untouched, skipping every cleanup and the final save, which is how a test stands in for a killed run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """Callbacks `train_student(..., hooks=TrainHooks(...))` calls at fixed points of each step."""

    on_batch: Callable[[int, list[int]], None] | None = None
    """`(epoch, sample_ids)` of each micro-batch, before this process trains on it."""

    on_step: Callable[[int, int], bool | None] | None = None
    """`(step, tokens)` after each optimizer step; `tokens` counts this process's trained positions so
    far. Returning True stops training there, and the student is saved as at a normal end (under
several processes, every process must return the same answer or the others wait forever)."""

    after_checkpoint: Callable[[int, Path], None] | None = None
    """`(step, checkpoint directory)` once the checkpoint of `step` is complete on disk."""

    evaluate: Callable[..., dict] | None = None
    """Scores the held-out split in place of `kdcache.evaluate`, with its signature
    `(model, cache, *, batch_size, sample_ids) -> dict`; the dict must hold `kl_to_teacher`, the
    lower-is-better figure that picks the best state and drives early stopping."""
