"""Validation during `train-student`: score a held-out split, keep the best state, stop early.

The held-out sequences come from `Cache.split` (deterministic by sample id), so training never
sees them and `kdcache eval --split-fraction` scores the same rows afterwards. "Best" means the
lowest held-out KL to the teacher: the quantity distillation optimises, not the training loss
(whose CE/hidden weights vary between runs). Every process scores the whole held-out split with
its own unwrapped model copy: redundant, but it needs no collective and every process reaches
the same stop decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from ..cache.cache import Cache
from .scoring import evaluate as kdcache_evaluate


class Validation:
    """When to score (`due`), what the best state was (`restore_best`), when to stop (`should_stop`)."""

    def __init__(self, cache: Cache, heldout: frozenset[int], *, every: int | None, patience: int | None,
                 batch_size: int, evaluate: Callable[..., dict] | None = None):
        self.cache = cache
        self.evaluate = evaluate or kdcache_evaluate  # TrainHooks.evaluate
        self.heldout = heldout
        self.every = every
        self.patience = patience
        self.batch_size = batch_size
        self.best_kl = math.inf
        self.best_step = 0
        self.evaluations_without_improvement = 0
        self.best_state: dict[str, dict] = {}
        self.last: dict = {}

    def due(self, step: int, total_steps: int) -> bool:
        """Every `every` optimizer steps, and always at the last step so the final state competes."""
        return step == total_steps or (self.every is not None and step % self.every == 0)

    def run(self, modules: dict[str, nn.Module], step: int) -> dict:
        """Score `modules["model"]` on the held-out split; snapshot `modules` (CPU copies) if best yet."""
        scores = self.evaluate(modules["model"], self.cache, batch_size=self.batch_size, sample_ids=self.heldout)
        if scores["kl_to_teacher"] < self.best_kl:
            self.best_kl, self.best_step = scores["kl_to_teacher"], step
            self.best_state = {name: {key: value.detach().to("cpu", copy=True)
                                      for key, value in module.state_dict().items()}
                               for name, module in modules.items()}
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        self.last = {"step": step, **{f"val_{name}": scores[name] for name in  # classification: KL only
                                      ("kl_to_teacher", "top1_agreement", "nll", "perplexity") if name in scores},
                     "best_step": self.best_step}
        return self.last

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evaluations_without_improvement >= self.patience

    def restore_best(self, modules: dict[str, nn.Module]) -> None:
        """Load the best snapshot; keep the current state if no score was ever finite (diverged run)."""
        for name, module in modules.items() if self.best_state else ():
            module.load_state_dict(self.best_state[name])

    def state_dict(self) -> dict:
        """What an exactly resumed run needs (saved in each checkpoint): the best score and its step, the
        patience counter, the last record and the best-state snapshot (CPU tensors, one model's size)."""
        return {"best_kl": self.best_kl, "best_step": self.best_step,
                "evaluations_without_improvement": self.evaluations_without_improvement,
                "best_state": self.best_state, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.best_kl, self.best_step = state["best_kl"], state["best_step"]
        self.evaluations_without_improvement = state["evaluations_without_improvement"]
        self.best_state, self.last = state["best_state"], state["last"]

    def summary(self) -> dict:
        return {"heldout_sequences": len(self.heldout), "best_step": self.best_step,
                "best_val_kl_to_teacher": self.best_kl, "last": self.last,
                "stopped_early": self.should_stop}


def setup_validation(cache: Cache, *, fraction: float, every: int | None, patience: int | None, batch_size: int,
                     evaluate: Callable[..., dict] | None = None) -> tuple[frozenset[int] | None, Validation | None]:
    """(training sample ids, Validation) for `val_fraction`; (None, None) when it is 0. `evaluate`
    replaces `kdcache.evaluate` as the held-out scorer (see TrainHooks.evaluate)."""
    if not fraction:
        return None, None
    split = cache.split(fraction, setting="val_fraction")
    return split.train, Validation(cache, split.heldout, every=every, patience=patience, batch_size=batch_size,
                                   evaluate=evaluate)
