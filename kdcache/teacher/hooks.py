"""Explicit seams into `dump_teacher`: where the shard bytes go.

Tests must make writing fail the way a full disk does, and a user may want to count or throttle
what a dump writes; patching pyarrow or `open` for that breaks whenever an import moves. This is
the supported way instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..cache.writer import open_for_writing


@dataclasses.dataclass(frozen=True)
class DumpHooks:
    """Callbacks `dump_teacher(..., hooks=DumpHooks(...))` calls; every process calls its own."""

    open_shard: Callable[[Path], BinaryIO] = open_for_writing
    """Opens each shard's `.partial` file for writing. The shard writer fsyncs it, so it must be (or wrap)
    a real file with `fileno()`; an `OSError` it or its `write` raises fails the dump like a disk error."""
