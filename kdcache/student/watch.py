"""Signs, while a student trains, that the run will not give a useful student: said once each, as a
`KDCacheWarning`, without stopping the run (a warning can be wrong; a stopped week-long run cannot be
given back).

Two checks, both on what the run sees anyway:

- **Degenerate targets**, at the first logged window: the cached inputs are mostly the tokenizer's
  unknown token (the teacher saw no text: tasks/unknown.py), the teacher's top-1 is the same class at
  nearly every position, its top-1 probability is ~1 nearly everywhere (entropy ~0: the soft targets say
  no more than hard labels), or the loss is ~0 from the start (the student already matches the targets).
  Looked at on at most `WATCH_ROWS` rows of that window, so the cost does not grow with the run.
- **A loss that does not fall**: once the warm-up is over and `LOSS_CHECK_SHARE` of the run is done, the
  mean loss of the latest logged window is compared with the first logged window's; if it has not fallen
  by `LOSS_FALL`, the learning rate is the usual cause (too small when the loss is flat, too large when it
  rose). Runs of fewer than `LOSS_CHECK_MIN_STEPS` steps are not checked. A resumed run compares with
  the first window it logs itself, and skips the check when it resumes past the point where it is due.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import warn
from ..tasks.unknown import UNKNOWN_SHARE_WARNING, unknown_tokens
from .batching import Batch

WATCH_ROWS = 256         # rows of the first logged window whose inputs and top-1 targets are looked at
LOSS_CHECK_SHARE = 0.25  # the loss check waits for the end of the warm-up and this share of the steps
LOSS_FALL = 0.05         # ... by then the loss must be this share below the first logged window's
LOSS_ROSE = 0.05         # above the first window by more than this share: the learning rate is too large
LOSS_CHECK_MIN_STEPS = 20  # shorter runs are smoke tests: too few steps for the loss to say anything
ZERO_LOSS = 1e-4         # a first-window loss below this: the student has nothing to learn
SAME_TOP1_SHARE = 0.99   # degenerate when the teacher's top-1 is one class at this share of positions ...
CERTAIN_PROBABILITY = 0.999  # ... or its top-1 probability is above this ...
CERTAIN_SHARE = 0.99         # ... at this share of positions


class TrainingWatch:
    """Fed every micro-batch (`batch`) and every logged metrics record (`logged`) by the training loop."""

    def __init__(self, *, total_steps: int, warmup_steps: int, lr: float, tokenizer, uses_targets: bool,
                 start_step: int = 0, enabled: bool = True):
        self.tokenizer = tokenizer
        self.uses_targets = uses_targets  # False for a CE-only run: the teacher's targets do not matter
        self.lr = lr
        self.total_steps = total_steps
        self.check_step = max(warmup_steps, math.ceil(LOSS_CHECK_SHARE * total_steps))
        self.enabled = enabled
        self.first: dict | None = None
        self.loss_checked = start_step >= self.check_step or total_steps < LOSS_CHECK_MIN_STEPS
        self.inputs: list[np.ndarray] = []
        self.top1_ids: list[np.ndarray] = []
        self.top1_logprobs: list[np.ndarray] = []

    def batch(self, batch: Batch) -> None:
        """Keep the inputs and top-1 targets of the first `WATCH_ROWS` rows before the first logged window."""
        if not self.enabled or self.first is not None or len(self.inputs) >= WATCH_ROWS:
            return
        valid = batch.valid.cpu()
        self.inputs += [row[mask].numpy() for row, mask in zip(batch.input_ids.cpu(), valid)]
        if batch.topk_ids is not None:
            at = batch.targets_at.cpu()
            self.top1_ids.append(batch.topk_ids[..., 0].cpu()[at].numpy())
            self.top1_logprobs.append(batch.topk_logprobs[..., 0].float().cpu()[at].numpy())

    def logged(self, record: dict) -> None:
        """After each metrics record (`step`, `loss`): the checks that are due."""
        if not self.enabled or "loss" not in record:
            return
        if self.first is None:
            self.first = record
            self._check_targets(record["loss"])
            self.inputs, self.top1_ids, self.top1_logprobs = [], [], []
        elif not self.loss_checked and record["step"] >= self.check_step:
            self.loss_checked = True
            self._check_loss(record)

    def _check_targets(self, loss: float) -> None:
        reasons = []
        count = unknown_tokens(self.inputs, self.tokenizer)
        if count is not None and count["share"] > UNKNOWN_SHARE_WARNING:
            reasons.append(f"{count['share']:.0%} of the input tokens are the unknown token {count['token']} "
                           f"(the teacher's tokenizer does not fit the text)")
        if self.uses_targets and self.top1_ids:
            ids, logprobs = np.concatenate(self.top1_ids), np.concatenate(self.top1_logprobs)
            if len(ids):
                values, counts = np.unique(ids, return_counts=True)
                if counts.max() >= SAME_TOP1_SHARE * len(ids):
                    reasons.append(f"the teacher's top-1 is id {values[counts.argmax()]} at "
                                   f"{counts.max() / len(ids):.1%} of the positions")
                certain = np.count_nonzero(logprobs > math.log(CERTAIN_PROBABILITY)) / len(ids)
                if certain >= CERTAIN_SHARE:
                    reasons.append(f"the teacher is {CERTAIN_PROBABILITY:.1%} sure at {certain:.1%} of the positions "
                                   f"(entropy ~0: the soft targets say no more than hard labels)")
        if loss < ZERO_LOSS:
            reasons.append(f"the loss is {loss:.2g} from the start (the student already matches the targets)")
        if reasons:
            warn(f"the targets look degenerate in the first {self.first['step']} steps: " + "; ".join(reasons)
                 + ": the student will learn little from them")

    def _check_loss(self, record: dict) -> None:
        first, last = self.first["loss"], record["loss"]
        if not math.isfinite(last):
            return  # a diverged run says so in its losses
        if last > (1 + LOSS_ROSE) * first:
            advice = "it rose: try a smaller `lr` (e.g. a tenth)"
        elif last > (1 - LOSS_FALL) * first:
            advice = "try a larger `lr` (e.g. 10×)"
        else:
            return
        warn(f"the training loss has not fallen after {record['step']} of {self.total_steps} steps "
             f"({first:.4g} at step {self.first['step']}, {last:.4g} at step {record['step']}) with `lr` "
             f"{self.lr:g}: {advice}")
