"""`dump-teacher`: run a teacher once and write its targets to a cache (see dump.py)."""

from .dump import dump_teacher
from .hooks import DumpHooks
from .settings import DumpSettings

__all__ = ["DumpHooks", "DumpSettings", "dump_teacher"]
