"""The one exception type for mistakes a user can fix.

The CLI turns a `KDCacheError` into a one-line message and a non-zero exit; anything else is a
bug and keeps its traceback. Library code raises it for bad paths, bad settings, incompatible
models and damaged caches, with a message that names the cause.
"""


class KDCacheError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


def require_positive(settings, *names: str) -> None:
    """Refuse a setting that must be positive, naming its flag; None (an unset optional) passes."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise KDCacheError(f"--{name.replace('_', '-')} must be positive, got {value}")


def first_line(error: Exception) -> str:
    """The first line of a library's (often multi-line) exception message, for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
