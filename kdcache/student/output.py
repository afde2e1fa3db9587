"""Where a run writes: `OUT.partial` while it runs (checkpoints included), renamed to `OUT` when done."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import KDCacheError
from .checkpoint import (
    CHECKPOINTS_DIR,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def prepare_output(out: Path, resuming: bool) -> Path:
    """Refuse to overwrite; build in `<out>.partial` so a crash never leaves a half-saved model.

    The staging directory also holds the run's checkpoints: it is kept when resuming and never
    silently wiped while it holds checkpoints.
    """
    if out.exists() and any(out.iterdir()):
        raise KDCacheError(f"output directory {out} exists and is not empty")
    staging = staging_dir(out)
    if not resuming:
        if list_checkpoints(staging / CHECKPOINTS_DIR):
            raise KDCacheError(f"{staging} holds checkpoints of an interrupted run: pass `resume` to continue it "
                               f"or delete it to start over")
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def checkpoint_to_resume(out: Path, resume: bool, resume_from: str | Path | None) -> Path | None:
    """`--resume-from CKPT`, else with `--resume` the latest checkpoint in `<out>.partial` (None: start fresh)."""
    if resume_from is not None:
        return resolve_checkpoint(Path(resume_from))
    if resume and out.exists() and any(out.iterdir()):
        raise KDCacheError(f"nothing to resume: {out} holds a finished run")
    return latest_checkpoint(staging_dir(out) / CHECKPOINTS_DIR) if resume else None
