"""Every setting of `dump-teacher`, defined once: the CLI's options are generated from these fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..cache.format import MAX_SAMPLES, TARGET_TYPES
from ..errors import KDCacheError
from ..settings import check_fields, setting
from ..tasks import CAUSAL_LM, TASKS


@dataclasses.dataclass
class DumpSettings:
    """Every setting of a dump; `content_settings()` are those that change what the cache holds.

    `device_map` (placement) and `skip_nonfinite` (whether to commit without rows whose targets are
    NaN/inf) never change a written row, so a dump may be resumed with other values of them.
    """

    top_k: int = setting(64, "Teacher log-probs kept per position (classification: every label up to 256).",
                         positive=True)
    max_length: int = setting(1024, "Truncate sequences to this many tokens.", positive=True)
    batch_size: int = setting(8, "Sequences per teacher forward pass.", positive=True)
    hidden_layers: tuple[int, ...] = setting((), "Hidden states to cache, HF indexing (0 = embeddings, -1 = last), "
                                                 "e.g. '-1' or '4,8'.")
    limit: int | None = setting(None, "Dump only the first N rows.", positive=True)
    dtype: str = setting("auto", "Teacher weights' dtype ('auto': the checkpoint's own).",
                         choices=("auto", "float32", "bfloat16", "float16"))
    logprob_dtype: str = setting("float16", "Storage type of the cached log-probs.", choices=("float16", "float32"))
    shard_rows: int = setting(10_000, "Sequences per shard file; also the unit of work lost when a dump is killed "
                                      "and resumed.", positive=True)
    split: str = setting("train", "Split of the dataset to dump.")
    text_column: str = setting("text", "Causal LM and sequence classification: the text column (a causal LM reads "
                                       "an input_ids column instead when present).")
    device_map: str | None = setting(None, "Spread a teacher too big for one device over the machine's devices, "
                                           "e.g. 'auto' (one process).")
    skip_nonfinite: bool = setting(False, "Commit the cache without the sequences whose targets are NaN/inf "
                                          "(listed in the manifest).")
    targets: str = setting("topk", "Top-k log-probs + exact tail, ids sampled from the teacher with counts, or both "
                                   "(causal LM only: classification caches store every label's probability).",
                           choices=("topk", "sampled", "both"))
    samples: int = setting(50, "Draws per position for sampled targets (T=1).")
    fidelity_every: int = setting(8, "The fidelity card measures every N-th target position of each batch "
                                     "(1 = all; costs dump speed).", positive=True)
    seed: int = setting(0, "Seed of the draws (combined with each sample id).")
    task: str | None = setting(None, "Default: inferred from the teacher config's architectures.", choices=TASKS)
    tokens_column: str = setting("tokens", "Token classification: the column of word lists.")
    labels_column: str | None = setting(None, "Token classification: gold labels per word, ids or names "
                                              "(default: 'ner_tags' if present).")
    label_column: str | None = setting(None, "Sequence classification: the gold label column "
                                             "(default: 'label' if present).")
    text_pair_column: str | None = setting(None, "Sequence classification: the second text of pairs.")
    pooled: bool = setting(False, "Encoders: also cache the pooler's output ('pooled' column).")
    gguf_file: str | None = setting(None, "A GGUF teacher: the .gguf file inside the `teacher` directory (a path "
                                          "ending in .gguf may also be given as the teacher itself).")

    def __post_init__(self):
        check_fields(self)
        if not 0 < self.samples <= MAX_SAMPLES:
            raise KDCacheError(f"`samples` must be between 1 and {MAX_SAMPLES}, got {self.samples}")

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
        del settings["gguf_file"]  # which teacher: the manifest's teacher record (with the file's sha256) says it
        return settings


_CLASSIFICATION_SETTINGS = ("task", "tokens_column", "labels_column", "label_column", "text_pair_column", "pooled")
