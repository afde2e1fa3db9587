"""Training checkpoints for exact resume: save atomically, keep the last few, find the latest.

A checkpoint is `checkpoints/step-NNNNNNNN/` inside the run's output staging directory
(`OUT.partial/`, so it survives a crash and ends up in `OUT/checkpoints/` when the run
completes). Accelerate writes the model (safetensors), optimizer, scheduler and per-process RNG
states into `step-NNNNNNNN.partial/`; kdcache's own state (`TrainingProgress`: step, epoch, reader
position, metrics counters; the validation's best score and best-state snapshot) goes next to them
as JSON plus safetensors (`save_safe_state`); the main process adds a copy of `metrics.jsonl`, then
renames the directory: a checkpoint directory without `.partial` is always complete.

Checkpoints travel (finished students ship theirs), so loading one must not run code. kdcache
registers no custom objects with Accelerate (whose `custom_checkpoint_N.pkl` it would unpickle with
`weights_only=False`), and Accelerate loads the optimizer, scheduler and RNG files with
`weights_only=True`. A checkpoint holding anything that would need a full unpickler (a custom
checkpoint, or a file the restricted unpickler refuses) is refused with one line.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import KDCacheError, first_line

CHECKPOINTS_DIR = "checkpoints"
PREFIX = "step-"
METRICS_COPY = "metrics.jsonl"
STATE_FILE = "kdcache_state.json"
STATE_TENSORS = "kdcache_state.safetensors"
_TENSOR = "__tensor__"


class TrainingProgress:
    """Where the loop stands, saved with each checkpoint by `register_safe_state` (JSON).

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


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """`value` with every tensor replaced by a reference into `tensors` (saved as safetensors)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").clone().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        return {str(name): _split_tensors(item, tensors, f"{key}/{name}") for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_tensors(item, tensors, f"{key}/{index}") for index, item in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {name: _join_tensors(item, tensors) for name, item in value.items()}
    if isinstance(value, list):
        return [_join_tensors(item, tensors) for item in value]
    return value


def register_safe_state(accelerator: Accelerator, objects: dict[str, Any]) -> None:
    """Save the state dicts of `objects` with every checkpoint as JSON + safetensors, and load them back
    when a checkpoint is resumed: the part of a checkpoint kdcache defines holds no pickle at all."""
    def save(models, weights, output_dir) -> None:
        if accelerator.is_main_process:
            tensors: dict[str, torch.Tensor] = {}
            state = {name: _split_tensors(obj.state_dict(), tensors, name) for name, obj in objects.items()}
            (Path(output_dir) / STATE_FILE).write_text(json.dumps(state) + "\n")
            save_file(tensors, str(Path(output_dir) / STATE_TENSORS))

    def load(models, input_dir) -> None:
        directory = Path(input_dir)
        try:
            tensors = load_file(str(directory / STATE_TENSORS))
            state = _join_tensors(json.loads((directory / STATE_FILE).read_bytes()), tensors)
            for name, obj in objects.items():
                obj.load_state_dict(state[name])
        except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as error:
            raise KDCacheError(f"checkpoint {directory} has an unreadable {STATE_FILE} / {STATE_TENSORS} "
                               f"({type(error).__name__}: {first_line(error)})") from None

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """`accelerator.load_state(path)`, refusing anything that would need a full (code-running) unpickler."""
    pickles = sorted(entry.name for entry in path.glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise KDCacheError(f"checkpoint {path} holds pickled objects ({', '.join(pickles)}): refused, loading them "
                           f"could run code (kdcache checkpoints keep their state in {STATE_FILE})")
    # no state file is ever empty, and Accelerate skips RNG states it cannot read (the resume would then not be
    # exact): an emptied file (a full disk, a partial copy) is refused here, naming it
    emptied = sorted(entry.name for entry in path.iterdir()
                     if entry.name != METRICS_COPY and entry.is_file() and entry.stat().st_size == 0)
    if emptied:
        raise KDCacheError(f"checkpoint {path} has empty files ({', '.join(emptied)}): it was cut short; "
                           f"resume from an earlier checkpoint")
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:
        raise KDCacheError(f"checkpoint {path} holds pickled objects that would need weights_only=False "
                           f"({first_line(error)}): refused, loading them could run code") from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError) as error:  # EOF: cut short
        raise KDCacheError(f"cannot load checkpoint {path}: {type(error).__name__} "
                           f"{first_line(error)}") from None


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
    """Write checkpoint `step` atomically (every process takes part), then keep only the last `keep`.

    A failed write (disk full) removes the partial directory and stops the run; the last complete
    checkpoint is untouched, since old ones are deleted only after the new one is in place.
    """
    target = root / f"{PREFIX}{step:08d}"
    partial = target.with_name(target.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process and metrics_file.is_file():
            shutil.copyfile(metrics_file, partial / METRICS_COPY)
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        kept = latest_checkpoint(root)
        raise KDCacheError(f"cannot write checkpoint {target}: {getattr(error, 'strerror', None) or error}; "
                           + (f"the last complete checkpoint {kept} is kept" if kept else "no checkpoint was kept"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


def resolve_checkpoint(path: Path) -> Path:
    """Check that `path` (from `--resume-from`) is a complete checkpoint directory."""
    if not path.is_dir() or _step_of(path) is None or not (path / STATE_FILE).is_file():
        raise KDCacheError(f"{path} is not a kdcache checkpoint (expected a complete "
                           f"{CHECKPOINTS_DIR}/{PREFIX}NNNNNNNN directory)")
    return path
