"""Settings defined once: a dataclass field carries its default, help text and constraints.

`DumpSettings` and `TrainSettings` declare each field with `setting(...)`. From that one
declaration the CLI generates its option (name, type, default, help, choices) and the dataclass
validates itself on construction (`check_fields` in `__post_init__`), so a Python caller and a
CLI user get the same refusal. Library errors name settings as `` `field_name` `` (backticks);
only cli.py turns those names into flags (`--field-name`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

from .errors import KDCacheError

# Choices of loss settings, here (not in losses.py) so that settings and the command line need no torch.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv", "akl", "hard")
TAIL_MODES = ("rest-bucket", "renormalize", "ignore")


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None, positive: bool = False,
            non_negative: bool = False, below: float | None = None, cli: bool = True) -> Any:
    """A settings field: `positive`/`non_negative`/`below` (exclusive upper bound) and `choices` are checked
    by `check_fields`; None always passes (an unset optional). `cli=False` keeps it out of the CLI."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "positive": positive,
                "non_negative": non_negative, "below": below, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(settings) -> None:
    """Refuse a value outside its field's declared constraints, naming the field."""
    for field in dataclasses.fields(settings):
        value, meta = getattr(settings, field.name), field.metadata
        if value is None or not meta:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise KDCacheError(f"`{field.name}` must be one of {', '.join(meta['choices'])}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and math.isnan(value):
            raise KDCacheError(f"`{field.name}` must be a number, got {value}")
        if meta.get("non_negative") and meta.get("below") is not None and not 0 <= value < meta["below"]:
            raise KDCacheError(f"`{field.name}` must be in [0, {meta['below']}), got {value}")
        if meta.get("positive") and not value > 0:
            raise KDCacheError(f"`{field.name}` must be positive, got {value}")
        if meta.get("non_negative") and not value >= 0:
            raise KDCacheError(f"`{field.name}` must not be negative, got {value}")
        if meta.get("below") is not None and not value < meta["below"]:
            raise KDCacheError(f"`{field.name}` must be below {meta['below']}, got {value}")


def threads_setting() -> Any:
    """The `threads` field every settings object has: library calls apply the command line's thread policy
    (kdcache/runtime.py) unless told otherwise. Not a CLI option of its own: every command has `--threads`."""
    return setting(None, THREADS_HELP, positive=True, cli=False)


THREADS_HELP = "CPU threads for torch (default: the free physical cores; OMP_NUM_THREADS is respected)."


def recorded(settings) -> dict[str, Any]:
    """The settings a manifest, a fingerprint or a training record keeps: all but `threads`, which changes
    how fast, not what."""
    values = dataclasses.asdict(settings)
    values.pop("threads", None)
    return values


def applies_threads(function):
    """Run the library call `function` under its `settings.threads` (default: the command line's policy,
    kdcache/runtime.py: on a busy machine torch's own default can be several times slower), restoring the
    caller's thread count afterwards."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        from .runtime import configure_threads, thread_settings
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with thread_settings():
            configure_threads(bound.arguments["settings"].threads)
            return function(*args, **kwargs)

    return call
