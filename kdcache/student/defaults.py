"""The defaults that depend on the student, resolved in one place once the student is loaded.

Most of `train-student`'s defaults are plain values on `TrainSettings`, chosen by the sweep of
tools/sweep_defaults.py (docs/train.md, "Defaults"). The learning rate is not: in the sweep the best
learning rate of a fresh student fell from 1e-2 at 64 wide to 3e-3 at 128, and a student carved from
its teacher (the 128-wide shape, but starting near the teacher) was best at 1e-3, larger steps undoing
the teacher's weights. So `lr` defaults to None and `resolve_defaults` picks it for the loaded
student: `FRESH_LR` or `PRETRAINED_LR` at `REFERENCE_WIDTH`, scaled by `REFERENCE_WIDTH / width`. `train_student` and `DistillationTrainer` both call
it, so the CLI, the Python API and the Trainer train with the same numbers, and the run records which
values were defaults and why.
"""

from __future__ import annotations

import dataclasses

from .settings import TrainSettings

REFERENCE_WIDTH = 64  # hidden size of the demo's fresh student, the sweep's reference
FRESH_LR = 1e-2  # peak learning rate of a randomly initialised student at the reference width
PRETRAINED_LR = 2e-3  # of a student with pretrained weights (carved, or loaded with from_pretrained)


def student_width(model) -> int | None:
    """The student's hidden size, when its config names one (`hidden_size`, or an alias such as GPT-2's `n_embd`)."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    return width if isinstance(width, int) and width > 0 else None


def is_pretrained(model) -> bool:
    """Whether `model` was loaded with weights (`from_pretrained` records where from; `from_config` leaves it empty)."""
    return bool(getattr(model, "name_or_path", ""))


def default_lr(width: int | None, pretrained: bool) -> float:
    """The peak learning rate for a student `width` wide (the reference width's when unknown)."""
    return (PRETRAINED_LR if pretrained else FRESH_LR) * REFERENCE_WIDTH / (width or REFERENCE_WIDTH)


def resolve_defaults(settings: TrainSettings, model) -> tuple[TrainSettings, dict[str, str]]:
    """`settings` with every student-dependent default filled in for `model`, and for each filled field
    why it got its value (e.g. {"lr": "lr 1.0e-02 (default for a fresh 64-wide student)"}). Explicit values
    are kept."""
    if settings.lr is not None:
        return settings, {}
    width, pretrained = student_width(model), is_pretrained(model)
    lr = default_lr(width, pretrained)
    kind = "pretrained" if pretrained else "fresh"
    reason = (f"default for a {kind} {width}-wide student" if width
              else f"default for a {kind} student; its config names no hidden_size")
    return dataclasses.replace(settings, lr=lr), {"lr": f"lr {lr:.1e} ({reason})"}
