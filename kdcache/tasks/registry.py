"""The task objects by name, and finding a model's task."""

from __future__ import annotations

from ..errors import KDCacheError
from .base import Task
from .classification import SequenceClassification, TokenClassification
from .names import CAUSAL_LM

TASKS = {task.name: task for task in (Task(), TokenClassification(), SequenceClassification())}


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
