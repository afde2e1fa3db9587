"""Training checkpoints for exact resume: save atomically, keep the last few, find the latest.

A checkpoint is `checkpoints/step-NNNNNNNN/` inside the run's output staging directory
(`OUT.partial/`, so it survives a crash and ends up in `OUT/checkpoints/` when the run
completes). Accelerate writes the model, optimizer, scheduler, per-process RNG states and the
registered `TrainingProgress` (step, epoch, reader position, metrics counters) into
`step-NNNNNNNN.partial/`, the main process adds a copy of `metrics.jsonl`, then renames the
directory: a checkpoint directory without `.partial` is always complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from ..errors import KDCacheError

CHECKPOINTS_DIR = "checkpoints"
PREFIX = "step-"
METRICS_COPY = "metrics.jsonl"


class TrainingProgress:
    """Where the loop stands, saved with each checkpoint through Accelerate's custom-object hook.

    `identity` holds everything that shapes the training trajectory (cache, world size, settings);
    resuming under a different identity would not reproduce the uninterrupted run, so it is refused.
    """

    def __init__(self, identity: dict):
        self.identity = identity
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of `epoch` already consumed by this process
        self.metrics: dict = {}

    def state_dict(self) -> dict:
        return {"identity": self.identity, "step": self.step, "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch, "metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        differing = sorted(name for name in set(state["identity"]) | set(self.identity)
                           if state["identity"].get(name) != self.identity.get(name))
        if differing:
            raise KDCacheError(f"cannot resume exactly: the checkpoint was made with a different "
                               f"{', '.join(differing)}")
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch, self.metrics = state["batches_in_epoch"], state["metrics"]


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and _step_of(path) is not None]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int, metrics_file: Path) -> Path:
    """Write checkpoint `step` atomically (every process takes part), then keep only the last `keep`."""
    target = root / f"{PREFIX}{step:08d}"
    partial = target.with_name(target.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if metrics_file.is_file():
            shutil.copyfile(metrics_file, partial / METRICS_COPY)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


def resolve_checkpoint(path: Path) -> Path:
    """Check that `path` (from `--resume-from`) is a complete checkpoint directory."""
    if not path.is_dir() or _step_of(path) is None or not (path / "custom_checkpoint_0.pkl").is_file():
        raise KDCacheError(f"{path} is not a kdcache checkpoint (expected a complete "
                           f"{CHECKPOINTS_DIR}/{PREFIX}NNNNNNNN directory)")
    return path
