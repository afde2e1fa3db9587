"""`dump-teacher`: run a teacher once and write its targets to a cache (see dump.py)."""

from .dump import dump_teacher
from .settings import DumpSettings

__all__ = ["DumpSettings", "dump_teacher"]
