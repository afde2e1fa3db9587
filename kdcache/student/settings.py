"""Every setting of `train-student`, defined once: the CLI's options are generated from these fields."""

from __future__ import annotations

import dataclasses

# Settings that do not change what is computed: they may differ between a run and its resumption.
OPERATIONAL_SETTINGS = ("log_every", "verify", "save_every", "keep_checkpoints", "prefetch", "read_through")


@dataclasses.dataclass
class TrainSettings:
    temperature: float = 1.0
    ce_weight: float = 0.0
    kd_weight: float = 1.0
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    pooled_weight: float = 0.0
    layer_map: str | None = None
    loss: str = "forward_kl"
    tail: str = "rest-bucket"
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    dtype: str = "float32"
    shuffle_buffer: int = 1024
    log_every: int = 10
    verify: bool = True
    targets: str = "topk"             # which cached target type feeds the KD loss: "topk" or "sampled"
    val_fraction: float = 0.0         # held-out share of the cache (by sample id), never trained on
    eval_every: int | None = None     # score the held-out split every N steps (and at the end)
    early_stopping: int | None = None  # stop after this many evaluations without a better val KL
    save_every: int | None = None
    keep_checkpoints: int = 2
    prefetch: int | None = None  # batches a loader worker reads ahead; None: 4 on an accelerator, 0 on CPU
    read_through: str | None = None
