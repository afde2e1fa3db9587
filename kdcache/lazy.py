"""Package attributes loaded on first use (PEP 562).

`import kdcache` and `kdcache --help` should not pay for torch, transformers and accelerate: a
package's `__init__` names what it exports and where it lives, and the module is imported the
first time the name is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """(`__getattr__`, `__dir__`) for `package` whose public names live in the modules `exports` maps them to
    (relative module names, e.g. ".train"); a loaded name is cached in the package's `namespace`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", exports))

    return __getattr__, __dir__
