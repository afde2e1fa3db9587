"""The training log: loss terms averaged between flushes, written to metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class MetricsLog:
    """Averages each loss term over the micro-batches since the last flush; writes JSONL lines."""

    def __init__(self, path: Path | None, num_processes: int):
        self.file = open(path, "a") if path else None  # a fresh file, or a resumed run's (see load_state_dict)
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
            if self.file:
                self.file.write(json.dumps(self.last) + "\n")
                self.file.flush()
            self.sums, self.micro = {}, 0
        return {"loss": f"{self.last.get('loss', float('nan')):.4f}",
                "tok_s": f"{self.last.get('tokens_per_second', 0):.0f}"}

    def write(self, record: dict) -> None:
        """Write a record of another kind (e.g. a validation score) as its own JSONL line."""
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

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
