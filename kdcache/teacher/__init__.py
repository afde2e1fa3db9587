"""`dump-teacher`: run a teacher once and write its targets to a cache (see dump.py); `recode`: rewrite one
into another codec without the teacher (recode.py).

The names load on first use (kdcache/lazy.py), so importing `kdcache.teacher.settings` (the CLI
does, to build its options) does not import the dump loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {"dump_teacher": ".dump", "DumpHooks": ".hooks", "DumpSettings": ".settings",
            "RecodeSettings": ".settings", "recode_cache": ".recode"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .dump import dump_teacher  # noqa: F401
    from .hooks import DumpHooks  # noqa: F401
    from .recode import recode_cache  # noqa: F401
    from .settings import DumpSettings, RecodeSettings  # noqa: F401

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
