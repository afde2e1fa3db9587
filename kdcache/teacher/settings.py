"""Every setting of `dump-teacher`, defined once: the CLI's options are generated from these fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..cache.format import TARGET_TYPES
from ..tasks import CAUSAL_LM


@dataclasses.dataclass
class DumpSettings:
    """Every setting of a dump; `content_settings()` are those that change what the cache holds.

    `device_map` (placement) and `skip_nonfinite` (whether to commit without rows whose targets are
    NaN/inf) never change a written row, so a dump may be resumed with other values of them.
    """

    top_k: int = 64
    max_length: int = 1024
    batch_size: int = 8
    hidden_layers: tuple[int, ...] = ()
    limit: int | None = None
    dtype: str = "auto"
    logprob_dtype: str = "float16"
    shard_rows: int = 10_000
    split: str = "train"
    text_column: str = "text"
    device_map: str | None = None
    skip_nonfinite: bool = False
    targets: str = "topk"   # "topk", "sampled" or "both"
    samples: int = 50       # draws per position for sampled targets
    fidelity_every: int = 8  # the fidelity card measures every N-th target position (1 = all)
    seed: int = 0           # seeds the draws (with each sample id)
    task: str | None = None  # None: inferred from the teacher's config
    tokens_column: str = "tokens"        # token classification: word lists
    labels_column: str | None = None     # token classification: per-word labels (default: 'ner_tags' if present)
    label_column: str | None = None      # sequence classification: one label (default: 'label' if present)
    text_pair_column: str | None = None  # sequence classification: second text of a pair
    pooled: bool = False                 # encoders: also cache the pooler's output

    @property
    def target_types(self) -> tuple[str, ...]:
        return TARGET_TYPES if self.targets == "both" else (self.targets,)

    def content_settings(self) -> dict[str, Any]:
        """Settings that change the cache's bytes; the sampling ones only when something is sampled,
        so a top-k dump keeps the fingerprint it had before sampled targets existed."""
        settings = self.resume_settings()
        del settings["batch_size"], settings["shard_rows"], settings["fidelity_every"]
        if "sampled" not in self.target_types:
            del settings["targets"], settings["samples"], settings["seed"]
        if self.task in (None, CAUSAL_LM):  # causal-LM fingerprints stay what they were before tasks existed
            for name in _CLASSIFICATION_SETTINGS:
                del settings[name]
        return settings

    def resume_settings(self) -> dict[str, Any]:
        """What a resumed dump must share with the interrupted one: the same rows, batched the same way."""
        settings = dataclasses.asdict(self)
        del settings["device_map"], settings["skip_nonfinite"]
        return settings


_CLASSIFICATION_SETTINGS = ("task", "tokens_column", "labels_column", "label_column", "text_pair_column", "pooled")
