"""One strategy per distillation task: what differs between them, so the dump, training and
evaluation loops do not (see tasks/base.py for the table of tasks).

The names and constants (tasks/names.py) load with the package; the strategies, which need torch,
load on first use (kdcache/lazy.py), so settings and the command line name tasks without torch."""

from __future__ import annotations

from ..lazy import lazy_exports
from .names import (
    CAUSAL_LM,
    FULL_DISTRIBUTION_MAX_LABELS,
    IGNORE_LABEL,
    SEQUENCE_CLASSIFICATION,
    TASK_NAMES,
    TOKEN_CLASSIFICATION,
)

_EXPORTS = {**{name: ".base" for name in ("Annotation", "Task", "TokenizedBatch", "generic_names", "pad_positions",
                                          "pooler", "target_mask")},
            **{name: ".classification" for name in ("SequenceClassification", "TokenClassification")},
            **{name: ".registry" for name in ("TASKS", "get_task", "infer_task", "resolve_task")}}

__all__ = ["CAUSAL_LM", "FULL_DISTRIBUTION_MAX_LABELS", "IGNORE_LABEL", "SEQUENCE_CLASSIFICATION", "TASK_NAMES",
           "TOKEN_CLASSIFICATION", *_EXPORTS]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
