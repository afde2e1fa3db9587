"""The one exception type for mistakes a user can fix.

The CLI turns a `KDCacheError` into a one-line message and a non-zero exit; anything else is a
bug and keeps its traceback. Library code raises it for bad paths, bad settings, incompatible
models and damaged caches, with a message that names the cause. A message names a setting or
argument as `` `field_name` ``: a Python caller reads the field, and the CLI shows the flag.
"""


class KDCacheError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


def first_line(error: Exception) -> str:
    """The first line of a library's (often multi-line) exception message, for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
