"""What a command reads (teacher, data, student, student config), checked without torch or transformers.

Importing torch and transformers takes seconds; a typo in a path should not. These checks need only
the file system, so the command line runs them before it imports anything heavy, and the library
runs the same ones first, so both report a missing input in one line naming what it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import KDCacheError

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
# the packaged `datasets` builder of each local data file type (teacher/data.py)
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
                 ".arrow": "arrow"}


def with_gguf_file(name_or_path: str, gguf_file: str | None) -> str:
    """The one path the loaders take for "a directory plus the GGUF file in it" (`gguf_file` setting)."""
    if gguf_file is None:
        return name_or_path
    if Path(gguf_file).name != gguf_file:
        raise KDCacheError(f"`gguf_file` must be a file name inside the teacher directory, got {gguf_file}")
    return str(Path(name_or_path) / gguf_file)


def is_gguf(name_or_path: str) -> bool:
    return Path(name_or_path).suffix.lower() == ".gguf"


def looks_local(name_or_path: str) -> bool:
    """A path the user meant as local (a hub id never starts with `.`, `/` or `~`)."""
    return name_or_path.startswith((".", "/", "~"))


def check_model_source(name_or_path: str, what: str, local: bool = False) -> None:
    """A local-looking path that does not exist is a typo, not a hub id to try online (`local`: no hub at all).
    A local directory asking for its own Python code is refused (kdcache never runs code shipped with a
    model, tokenizer or cache; see kdcache/models.py)."""
    path = Path(name_or_path).expanduser()
    if is_gguf(name_or_path):
        if not path.is_file():
            raise KDCacheError(f"{what} GGUF file not found: {name_or_path}")
        return
    if not path.exists() and (local or looks_local(name_or_path)):
        raise KDCacheError(f"{what} path not found: {name_or_path}")
    for name in REMOTE_CODE_FILES if path.is_dir() else ():
        try:
            asks_for_code = "auto_map" in json.loads((path / name).read_bytes())
        except (OSError, ValueError, TypeError):
            continue  # absent or unreadable: transformers reports it
        if asks_for_code:
            raise KDCacheError(f"{what} {name_or_path}/{name} asks to run its own code (auto_map): refused, "
                               f"kdcache never runs code shipped with a model, tokenizer or cache")


def check_data_source(source: str) -> None:
    """A data path that looks local (or names a data file) and does not exist."""
    path = Path(source).expanduser()
    if not path.exists() and (looks_local(source) or path.suffix in DATA_BUILDERS):
        raise KDCacheError(f"data path not found: {source}")


def check_student_sources(student: str | None, student_config: str | None) -> None:
    """Exactly one of a pretrained student and a config for a fresh one, and it exists."""
    if (student is None) == (student_config is None):
        raise KDCacheError("give exactly one of `student` (a pretrained student) and `student_config` "
                           "(a config for a fresh one)")
    if student_config is not None and not Path(student_config).expanduser().is_file():
        raise KDCacheError(f"student config not found: {student_config}")
    if student is not None:
        check_model_source(student, "student")


def check_dump_inputs(teacher: str, data: str, gguf_file: str | None = None) -> str:
    """Check dump-teacher's teacher and data; return the teacher path the loaders take (GGUF file included)."""
    teacher = with_gguf_file(teacher, gguf_file)
    check_model_source(teacher, "teacher")
    check_data_source(data)
    return teacher


def check_train_inputs(cache, student: str | None, student_config: str | None) -> None:
    """Check train-student's cache (its manifest is read: a missing or foreign directory fails here) and student."""
    from .cache.cache import Cache
    from .cache.store import CacheStore
    if not isinstance(cache, Cache):
        CacheStore(cache).load_manifest()
    check_student_sources(student, student_config)
