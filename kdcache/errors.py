"""The one exception type for mistakes a user can fix, and the one warning category for what only looks wrong.

The CLI turns a `KDCacheError` into a one-line message and a non-zero exit; anything else is a
bug and keeps its traceback. Library code raises it for bad paths, bad settings, incompatible
models and damaged caches, with a message that names the cause. A message names a setting or
argument as `` `field_name` ``: a Python caller reads the field, and the CLI shows the flag.
"""

import warnings


class KDCacheError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


def first_line(error: Exception) -> str:
    """The first line of a library's (often multi-line) exception message, for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class KDCacheWarning(UserWarning):
    """Something looks wrong but need not be (a tokenizer that does not fit the text, a loss that does
    not fall): the run goes on. One category, so a library user can filter them all
    (`warnings.filterwarnings("ignore", category=KDCacheWarning)`) or turn them into errors; the CLI
    prints each as one `Warning: ...` line.
    """


def warn(message: str) -> None:
    """Emit `message` as a `KDCacheWarning` attributed to the caller of the function that warns."""
    warnings.warn(message, KDCacheWarning, stacklevel=3)
