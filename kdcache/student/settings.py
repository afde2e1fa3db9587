"""Every setting of `train-student`, defined once: the CLI's options are generated from these fields."""

from __future__ import annotations

import dataclasses

from ..cache.format import TARGET_TYPES
from ..errors import KDCacheError
from ..settings import DIVERGENCES, TAIL_MODES, check_fields, setting, threads_setting

TOKEN_MAPS = ("first-token", "exact")  # across tokenizers, see student/crosstok.py `vocabulary_map`

# Settings that do not change what is computed: they may differ between a run and its resumption.
OPERATIONAL_SETTINGS = ("log_every", "verify", "fused_loss", "save_every", "keep_checkpoints", "prefetch",
                        "read_through", "transfer_timeout", "report_to", "threads")


@dataclasses.dataclass
class TrainSettings:
    """Every setting of a training run. A resumed run must match the checkpoint's on all but
    `OPERATIONAL_SETTINGS`, which do not change what is computed."""

    loss: str = setting("forward_kl", "Divergence between teacher and student.", choices=DIVERGENCES)
    tail: str = setting("rest-bucket", "How the teacher mass outside the cached ids enters the loss.",
                        choices=TAIL_MODES)
    temperature: float = setting(1.0, "Softening temperature T, applied to both sides; the loss is scaled by T².",
                                 positive=True)
    ce_weight: float = setting(0.0, "Weight of the cross-entropy on gold labels (the next token for a causal LM).",
                               non_negative=True)
    kd_weight: float = setting(1.0, "Weight of T²·KD(teacher ‖ student).", non_negative=True)
    student_tokenizer: str | None = setting(None, "Train across tokenizers: the student's tokenizer (directory or hub "
                                                   "id) when it is not the cache's. Student positions are aligned to "
                                                   "the teacher's by character spans (the cache must hold offsets).")
    token_map: str = setting("first-token", "With `student_tokenizer`: which teacher ids map to a student id: those "
                                            "whose text is a student token (exact), or also the others, to the "
                                            "student's first token of their text (first-token).",
                             choices=TOKEN_MAPS)
    uld_weight: float = setting(0.0, "With `student_tokenizer`: weight of the sorted-probability (ULD) distance on "
                                     "the teacher mass that does not map to the student's vocabulary (off by "
                                     "default: it made the student worse in every configuration of "
                                     "docs/cross_tokenizer.md's benchmark).",
                                non_negative=True)
    hidden_weight: float = setting(0.0, "Weight of hidden-state matching.", non_negative=True)
    hidden_loss: str = setting("mse", "Hidden-state matching: mean squared error or 1 - cosine similarity per "
                                      "position.", choices=("mse", "cosine"))
    pooled_weight: float = setting(0.0, "Weight of matching the student's pooled output to the cached one "
                                        "(same loss as hidden_loss).", non_negative=True)
    layer_map: str | None = setting(None, "student:teacher hidden layer pairs, e.g. '2:6,4:12' "
                                          "(default: last student layer to last cached teacher layer).")
    lr: float | None = setting(None, "Peak learning rate (AdamW, linear warmup then cosine decay); default: "
                                     "1e-2 for a fresh student 64 wide, 2e-3 for a pretrained (carved) one, "
                                     "scaled by 64 / the student's hidden size (docs/train.md, Defaults).",
                                positive=True)
    weight_decay: float = setting(0.01, "AdamW weight decay.", non_negative=True)
    warmup_ratio: float = setting(0.05, "Share of the steps spent warming up the learning rate.", non_negative=True,
                                  below=1)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this (0: no clipping).", non_negative=True)
    batch_size: int = setting(16, "Sequences per micro-batch and process.", positive=True)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", positive=True)
    max_steps: int | None = setting(None, "Optimizer steps (default: one epoch, or `epochs` epochs).", positive=True)
    epochs: int | None = setting(None, "Passes over the cache (default: one, or until `max_steps`).", positive=True)
    seed: int = setting(0, "Seed of initialisation, shuffling and dropout.")
    dtype: str = setting("float32", "Mixed precision through Accelerate.", choices=("float32", "bfloat16", "float16"))
    shuffle_buffer: int = setting(1024, "Sequences in the streaming shuffle buffer.", positive=True)
    log_every: int = setting(10, "Write a metrics line every N steps.", positive=True)
    fused_loss: bool = setting(True, "Causal LMs: compute CE and KD from the student's final hidden states a few "
                                     "positions at a time through its output head, never holding batch × length × "
                                     "vocabulary logits (same loss and gradients up to rounding; off: the model's "
                                     "full logits, to compare). A model whose logits the head does not explain "
                                     "keeps the full logits, with a warning.")
    verify: bool = setting(True, "Re-hash every shard before training (off: check shard sizes only).")
    teachers: str | None = setting(None, "A multi-teacher cache's teachers to distil from at once, with weights, e.g. "
                                         "'a:0.6,b:0.4': the student learns the mixture of their distributions "
                                         "(weights normalised; default: the cache's own teacher alone).")
    targets: str | None = setting(None, "Which cached target type feeds the KD loss (default: the cache's own; "
                                        "top-k when it holds top-k and sampled).", choices=TARGET_TYPES)
    val_fraction: float = setting(0.0, "Hold out this fraction of the cache (by sample id) for validation; never "
                                       "trained on.", non_negative=True, below=1)
    eval_every: int | None = setting(None, "Score the held-out split every N steps (and at the end).", positive=True)
    early_stopping: int | None = setting(None, "Stop after this many evaluations without a lower held-out KL; the "
                                               "best state is saved.", positive=True)
    save_every: int | None = setting(None, "Write a checkpoint to OUT.partial/checkpoints every N steps.",
                                     positive=True)
    keep_checkpoints: int = setting(2, "How many of the latest checkpoints to keep.", positive=True)
    prefetch: int | None = setting(None, "Batches a background worker reads ahead; 0: read in the training process "
                                         "(default: 4 on an accelerator, 0 on CPU).", non_negative=True)
    read_through: str | None = setting(None, "For a remote cache: download each shard once to this directory and "
                                             "memory-map it.")
    transfer_timeout: float = setting(600.0, "For a remote cache: give up on one transfer (the manifest, a shard, "
                                             "a ranged read) after this many seconds, retries included.",
                                      positive=True)
    report_to: str | None = setting(None, "Also log every loss term, the learning rate and held-out scores to these "
                                          "trackers through Accelerate, comma-separated (tensorboard, trackio, wandb, "
                                          "mlflow, ...); files go to OUT/logs. metrics.jsonl is always written.")

    threads: int | None = threads_setting()

    def __post_init__(self):
        check_fields(self)
        self.teacher_weights()
        if not self.val_fraction:
            if self.eval_every is not None or self.early_stopping is not None:
                raise KDCacheError("`eval_every` and `early_stopping` need a validation split: set `val_fraction`")
        elif self.early_stopping is not None and self.eval_every is None:
            raise KDCacheError("`early_stopping` needs `eval_every` (how often to score the held-out split)")

    def teacher_weights(self) -> dict[str, float]:
        """`teachers` as {name: weight}, weights normalised to sum to one; empty when unset."""
        if self.teachers is None:
            return {}
        weights = {}
        for part in self.teachers.split(","):
            name, _, weight = part.strip().partition(":")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                value = float("nan")
            if not name or name in weights or not value > 0 or value == float("inf"):
                raise KDCacheError(f"`teachers` must list distinct names with positive weights, e.g. 'a:0.6,b:0.4'; "
                                   f"got {self.teachers!r}")
            weights[name] = value
        total = sum(weights.values())
        return {name: value / total for name, value in weights.items()}
