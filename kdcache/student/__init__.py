"""`train-student`, `eval` and `init-student`: everything after the cache (see train.py).

The names load on first use (kdcache/lazy.py), so importing `kdcache.student.settings` (the CLI
does, to build its options) does not import the training loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"evaluate": ".scoring", "TrainHooks": ".hooks", "init_student": ".init", "TrainSettings": ".settings",
            "train_student": ".train"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .scoring import evaluate  # noqa: F401
    from .hooks import TrainHooks  # noqa: F401
    from .init import init_student  # noqa: F401
    from .settings import TrainSettings  # noqa: F401
    from .train import train_student  # noqa: F401

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
