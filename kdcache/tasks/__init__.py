"""One strategy per distillation task: what differs between them, so the dump, training and
evaluation loops do not (see tasks/base.py for the table of tasks)."""

from __future__ import annotations

from ..errors import KDCacheError
from .base import (
    CAUSAL_LM,
    FULL_DISTRIBUTION_MAX_LABELS,
    IGNORE_LABEL,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    Annotation,
    Task,
    TokenizedBatch,
    generic_names,
    pad_positions,
    pooler,
    target_mask,
)
from .classification import SequenceClassification, TokenClassification

TASKS = {task.name: task for task in (Task(), TokenClassification(), SequenceClassification())}

__all__ = ["CAUSAL_LM", "FULL_DISTRIBUTION_MAX_LABELS", "IGNORE_LABEL", "SEQUENCE_CLASSIFICATION",
           "TOKEN_CLASSIFICATION", "TASKS", "Annotation", "Task", "TokenizedBatch", "generic_names", "get_task",
           "infer_task", "pad_positions", "pooler", "resolve_task", "target_mask"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KDCacheError(f"unknown task '{name}' (expected one of {', '.join(TASKS)})")
    return TASKS[name]


def infer_task(config) -> Task:
    """The task a model's `architectures` name, when they name exactly one; a config without any is a causal LM
    (what kdcache assumed before tasks existed)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        return TASKS[CAUSAL_LM]
    found = {task.name for architecture in architectures for task in TASKS.values()
             if architecture.endswith(task.architecture_suffixes)}
    if len(found) != 1:
        raise KDCacheError(f"cannot infer the task from the teacher's architectures ({', '.join(architectures)}); "
                           f"set `task` to one of {'|'.join(TASKS)}")
    return TASKS[found.pop()]


def resolve_task(name: str | None, teacher: str):
    """(task, config): `name` if given, else inferred from the teacher's config."""
    from ..models import load_config
    config = load_config(teacher, "teacher config")
    return (get_task(name) if name else infer_task(config)), config
