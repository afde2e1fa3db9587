"""The training log: loss terms averaged between flushes, written to metrics.jsonl and, when asked
(`report_to`), to experiment trackers through Accelerate (TensorBoard, trackio, W&B, MLflow, ...)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import KDCacheError

LOG_DIR = "logs"  # the trackers' files, inside the run's output directory
RUN_NAME = "train-student"


class MetricsLog:
    """Averages each loss term over the micro-batches since the last flush; writes JSONL lines."""

    def __init__(self, path: Path | None, num_processes: int, tracker: Callable[[dict, int], None] | None = None):
        self.file = open(path, "a") if path else None  # a fresh file, or a resumed run's (see load_state_dict)
        self.tracker = tracker  # e.g. Accelerator.log: (numeric values, step)
        self.num_processes = num_processes
        self.started = time.perf_counter()
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.last: dict = {}

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], tokens: int) -> None:
        self.tokens += tokens
        self.micro += 1
        for name, value in {"loss": loss, **terms}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().item()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, str]:
        """Write one record if anything was added since the last; return a progress-bar postfix."""
        if self.micro:
            self.last = {"step": step, "epoch": epoch, "lr": lr,
                         **{name: total / self.micro for name, total in self.sums.items()}, "tokens": self.tokens,
                         "tokens_per_second": self.tokens * self.num_processes / self.elapsed()}
            self.write(self.last)
            self.sums, self.micro = {}, 0
        return {"loss": f"{self.last.get('loss', float('nan')):.4f}",
                "tok_s": f"{self.last.get('tokens_per_second', 0):.0f}"}

    def write(self, record: dict) -> None:
        """Write one record (loss terms, or a validation score) as a JSONL line and to the trackers."""
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tracker:
            self.tracker({name: value for name, value in record.items()
                          if name != "step" and isinstance(value, (int, float))}, record["step"])

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "elapsed": self.elapsed(), "sums": dict(self.sums), "micro": self.micro,
                "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint (its metrics.jsonl is restored by the caller)."""
        self.tokens, self.sums, self.micro, self.last = state["tokens"], dict(state["sums"]), state["micro"], state["last"]
        self.started = time.perf_counter() - state["elapsed"]

    def close(self) -> None:
        if self.file:
            self.file.close()


def trackers(report_to: str | None) -> list[str]:
    """The Accelerate trackers named in `report_to` ("tensorboard,trackio"), each checked to be installed:
    Accelerate itself drops an unavailable tracker with a debug message, which would lose the curves
    silently."""
    if not report_to:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    known = [kind.value for kind in LoggerType if kind.value != "all"]
    available = {str(getattr(kind, "value", kind)) for kind in get_available_trackers()}
    for name in names:
        if name not in known:
            raise KDCacheError(f"`report_to` {name!r} is not a tracker Accelerate knows ({', '.join(known)})")
        if name not in available:
            raise KDCacheError(f"`report_to` {name}: its package is not installed (pip install {name})")
    return names


def tracker_config(settings: dict) -> dict:
    """The run's settings as the scalars trackers accept as hyper-parameters (None and lists dropped)."""
    return {name: value for name, value in settings.items() if isinstance(value, (bool, int, float, str))}
