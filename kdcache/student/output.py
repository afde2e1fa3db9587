"""Where a run writes: `OUT.partial` while it runs (checkpoints included), renamed to `OUT` when done.

kdcache deletes only what it made: `OUT.partial` carries a marker file from the moment it is
created, and a staging directory without it (someone's `results.partial/` full of their own files)
is refused, never wiped. The rename to `OUT` is the commit: a failed final save (disk full) removes
what it half-wrote and keeps the run's checkpoints, so nothing good is lost.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from ..errors import KDCacheError
from .checkpoint import CHECKPOINTS_DIR, latest_checkpoint, list_checkpoints, resolve_checkpoint

# What a student directory kdcache wrote holds (train-student's and init-student's records).
TRAINING_RECORD = "kdcache_training.json"
INIT_RECORD = "kdcache_init.json"
STUDENT_RECORDS = (TRAINING_RECORD, INIT_RECORD)

MARKER = ".kdcache-run"


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _holds_something(out: Path) -> bool:
    if out.exists() and not out.is_dir():
        raise KDCacheError(f"`out` {out} exists and is not a directory")
    return out.is_dir() and any(out.iterdir())


def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse an `out` that holds something, unless `overwrite` and it is a student kdcache wrote (its
    record file says so): kdcache never deletes a directory it did not make."""
    if not _holds_something(out):
        return
    if not overwrite:
        raise KDCacheError(f"output directory {out} exists and is not empty; pass `overwrite` to replace the "
                           f"student in it, or choose another `out`")
    if not any((out / name).is_file() for name in STUDENT_RECORDS):
        raise KDCacheError(f"`overwrite`: {out} was not written by kdcache (no {' or '.join(STUDENT_RECORDS)}); "
                           f"refusing to delete it")


def prepare_output(out: Path, resuming: bool, overwrite: bool = False) -> Path:
    """Check `out` (see `check_output`); build in `<out>.partial` so a crash never leaves a half-saved model.

    The staging directory also holds the run's checkpoints: it is kept when resuming and never
    silently wiped while it holds checkpoints, nor ever when kdcache did not create it.
    """
    check_output(out, overwrite)
    staging = staging_dir(out)
    if staging.exists() or staging.is_symlink():
        if staging.is_symlink() or not (staging / MARKER).is_file():
            raise KDCacheError(f"{staging} exists but kdcache did not create it: refusing to use or delete it; "
                               f"move it away or choose another `out`")
        if not resuming:
            if list_checkpoints(staging / CHECKPOINTS_DIR):
                raise KDCacheError(f"{staging} holds checkpoints of an interrupted run: pass `resume` to continue "
                                   f"it or delete it to start over")
            shutil.rmtree(staging)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MARKER).touch()
    except OSError as error:
        raise KDCacheError(f"cannot create {staging} (for `out` {out}): {error.strerror or error}") from None
    return staging


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing a previous student there (checked by
    `check_output`) only once the new one is complete."""
    if out.exists() and any(out.iterdir()):
        replaced = out.with_name(out.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        out.rename(replaced)
        staging.rename(out)
        shutil.rmtree(replaced)
        return
    if out.exists():
        out.rmdir()
    staging.rename(out)


def commit_output(out: Path, save: Callable[[Path], None]) -> None:
    """Run `save(staging)` (the final model, tokenizer, records), then `publish` the staging directory to `out`.

    If `save` fails (disk full, I/O error), what it wrote is removed and the checkpoints stay, so the
    run can be resumed once there is room; `out` never holds a half-written model.
    """
    staging = staging_dir(out)
    before = set(staging.iterdir())
    try:
        save(staging)
        publish(staging, out)
    except (OSError, RuntimeError, SafetensorError) as error:
        for path in set(staging.iterdir()) - before:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        kept = latest_checkpoint(staging / CHECKPOINTS_DIR)
        raise KDCacheError(f"cannot save the student to {out}: {getattr(error, 'strerror', None) or error}; "
                           + (f"checkpoint {kept} is kept: free space and rerun with `resume`" if kept else
                              "nothing was written")) from None


def checkpoint_to_resume(out: Path, resume: bool, resume_from: str | Path | None) -> Path | None:
    """`--resume-from CKPT`, else with `--resume` the latest checkpoint in `<out>.partial` (None: start fresh)."""
    if resume_from is not None:
        return resolve_checkpoint(Path(resume_from))
    if resume and _holds_something(out):
        raise KDCacheError(f"nothing to resume: {out} holds a finished run")
    return latest_checkpoint(staging_dir(out) / CHECKPOINTS_DIR) if resume else None
