"""Where a run writes: `OUT.partial` while it runs (checkpoints included), renamed to `OUT` when done."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import KDCacheError
from .checkpoint import CHECKPOINTS_DIR, latest_checkpoint, list_checkpoints, resolve_checkpoint

# What a student directory kdcache wrote holds (train-student's and init-student's records).
TRAINING_RECORD = "kdcache_training.json"
INIT_RECORD = "kdcache_init.json"
STUDENT_RECORDS = (TRAINING_RECORD, INIT_RECORD)


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse an `out` that holds something, unless `overwrite` and it is a student kdcache wrote (its
    record file says so): kdcache never deletes a directory it did not make."""
    if out.exists() and not out.is_dir():
        raise KDCacheError(f"`out` {out} is a file, not a directory")
    if not (out.exists() and any(out.iterdir())):
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
    silently wiped while it holds checkpoints.
    """
    check_output(out, overwrite)
    staging = staging_dir(out)
    if not resuming:
        if list_checkpoints(staging / CHECKPOINTS_DIR):
            raise KDCacheError(f"{staging} holds checkpoints of an interrupted run: pass `resume` to continue it "
                               f"or delete it to start over")
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
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


def checkpoint_to_resume(out: Path, resume: bool, resume_from: str | Path | None) -> Path | None:
    """`--resume-from CKPT`, else with `--resume` the latest checkpoint in `<out>.partial` (None: start fresh)."""
    if resume_from is not None:
        return resolve_checkpoint(Path(resume_from))
    if resume and out.exists() and any(out.iterdir()):
        raise KDCacheError(f"nothing to resume: {out} holds a finished run")
    return latest_checkpoint(staging_dir(out) / CHECKPOINTS_DIR) if resume else None
