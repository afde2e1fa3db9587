"""Every setting of `dump-teacher`, defined once: the CLI's options are generated from these fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..cache.codecs import COMPRESSIONS, LAYOUTS, LOGPROB_TYPES, Codec
from ..cache.format import MAX_SAMPLES
from ..errors import KDCacheError
from ..settings import check_fields, setting, threads_setting
from ..tasks.names import CAUSAL_LM, TASK_NAMES

AUGMENT_METHODS = ("mentions", "substitute", "mask")  # see teacher/augment.py


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """How many variants of each row to write, and how they are made (validated by DumpSettings)."""

    variants: int
    methods: tuple[str, ...]
    rate: float
    seed: int

    def record(self, original_rows: int) -> dict:
        """The manifest's `dataset.augmentation`: enough to rebuild the same variants, and to tell them apart."""
        return {"variants_per_row": self.variants, "methods": list(self.methods), "rate": self.rate,
                "seed": self.seed, "original_rows": original_rows, "variant_rows": original_rows * self.variants}


def parse_methods(methods: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in methods.split(",") if name.strip())
    unknown = sorted(set(names) - set(AUGMENT_METHODS))
    if not names or unknown:
        raise KDCacheError(f"`augment_methods` must be a comma-separated list of {', '.join(AUGMENT_METHODS)}, "
                           f"got {methods!r}")
    if "substitute" in names and "mask" in names:
        raise KDCacheError("`augment_methods`: choose one of substitute and mask (both act on the same words)")
    return names


@dataclasses.dataclass
class DumpSettings:
    """Every setting of a dump; `content_settings()` are those that change what the cache holds.

    `device_map` (placement), `fused_logits` (how the logits are computed) and `skip_nonfinite` (whether to
    commit without rows whose targets are NaN/inf) never change a written row, so a dump may be resumed with
    other values of them.
    """

    top_k: int | None = setting(None, "Teacher log-probs kept per position, at most (classification: every label up "
                                      "to 256); with `targets` head-tail, the size of the exact head (default: 4 "
                                      "for head-tail, else 64).", positive=True)
    top_p: float | None = setting(None, "Mass-adaptive head: keep ids per position only until their mass reaches "
                                        "this (at least one, at most `top_k`); compact codec only.", positive=True)
    max_length: int = setting(1024, "Truncate sequences to this many tokens.", positive=True)
    batch_size: int = setting(8, "Sequences per teacher forward pass.", positive=True)
    hidden_layers: tuple[int, ...] = setting((), "Hidden states to cache, HF indexing (0 = embeddings, -1 = last), "
                                                 "e.g. '-1' or '4,8'.")
    limit: int | None = setting(None, "Dump only the first N rows.", positive=True)
    dtype: str = setting("auto", "Teacher weights' dtype ('auto': the checkpoint's own).",
                         choices=("auto", "float32", "bfloat16", "float16"))
    logprob_dtype: str | None = setting(None, "Storage type of the cached log-probs (uint8: 8-bit codes in the log "
                                              "domain, 1/16 nat steps; compact codec only; default: uint8 when "
                                              "compact, else float16).", choices=LOGPROB_TYPES)
    codec: str = setting("compact", "Target layout: compact (format 2: flat ids as gaps, per-position lengths, "
                                  "narrow counts) or plain (format 1, readable by older kdcache).", choices=LAYOUTS)
    compression: str = setting("zstd", "Arrow IPC buffer compression of the shards (pyarrow and datasets read "
                                       "it transparently).", choices=COMPRESSIONS)
    shard_rows: int = setting(10_000, "Sequences per shard file; also the unit of work lost when a dump is killed "
                                      "and resumed.", positive=True)
    split: str = setting("train", "Split of the dataset to dump.")
    text_column: str = setting("text", "Causal LM and sequence classification: the text column (a causal LM reads "
                                       "an input_ids column instead when present).")
    device_map: str | None = setting(None, "Spread a teacher too big for one device over the machine's devices, "
                                           "e.g. 'auto' (one process).")
    fused_logits: bool = setting(True, "Causal LMs: run the teacher to its final hidden states and compute the "
                                       "logits through its output head a few positions at a time, never holding "
                                       "batch × length × vocabulary (the same cache bytes; off: the model's full "
                                       "logits, to compare). A teacher whose logits the head does not explain keeps "
                                       "the full logits, with a warning.")
    skip_nonfinite: bool = setting(False, "Commit the cache without the sequences whose targets are NaN/inf "
                                          "(listed in the manifest).")
    targets: str | None = setting(None, "Top-k log-probs + exact tail, ids sampled from the teacher with counts, both, "
                                        "or head-tail: the exact top-k head and tail mass plus `samples` draws from "
                                        "the renormalised tail (sampling is for causal LMs: classification caches "
                                        "store every label's probability). Default: head-tail for a causal LM (the "
                                        "best gap closed per byte, docs/frontier.md), topk when `top_k` or `top_p` "
                                        "is given or for a classifier.",
                                  choices=("topk", "sampled", "both", "head-tail"))
    samples: int | None = setting(None, "Draws per position for sampled targets (T=1), or from the tail for head-tail "
                                        "(default: 32 for head-tail, else 50).")
    sampling: str | None = setting(None, "How the draws are placed: systematic (one uniform per position, the N "
                                         "points spaced 1/N apart: each id drawn within one of N·p times, so N "
                                         "distinct ids where independent draws repeat some; lower variance, equally "
                                         "unbiased), proportional (head-tail: systematic, ceil(N × tail mass) draws "
                                         "per position) or independent (N uniforms each, the draws of earlier "
                                         "caches). Default: proportional for head-tail, else systematic.",
                                   choices=("systematic", "independent", "proportional"))
    fidelity_every: int = setting(8, "The fidelity card measures every N-th target position of each batch "
                                     "(1 = all; costs dump speed).", positive=True)
    seed: int = setting(0, "Seed of the draws (combined with each sample id).")
    task: str | None = setting(None, "Default: inferred from the teacher config's architectures.", choices=TASK_NAMES)
    tokens_column: str = setting("tokens", "Token classification: the column of word lists.")
    labels_column: str | None = setting(None, "Token classification: gold labels per word, ids or names "
                                              "(default: 'ner_tags' if present).")
    label_column: str | None = setting(None, "Sequence classification: the gold label column "
                                             "(default: 'label' if present).")
    text_pair_column: str | None = setting(None, "Sequence classification: the second text of pairs.")
    pooled: bool = setting(False, "Encoders: also cache the pooler's output ('pooled' column).")
    augment: int = setting(0, "Also dump this many teacher-labelled variants of every row (their gold labels "
                              "dropped): entity mentions swapped by type, words swapped for the teacher's "
                              "embedding neighbours or masked (docs/dump.md, 'Augmentation').", non_negative=True)
    augment_methods: str | None = setting(None, "With `augment`: comma-separated, of mentions, substitute, mask "
                                                "(default: mentions,substitute for tagged token classification, "
                                                "else substitute).")
    augment_rate: float = setting(0.3, "With `augment`: the share of words (outside mentions) each variant changes.",
                                  positive=True, below=1)
    gguf_file: str | None = setting(None, "A GGUF teacher: the .gguf file inside the `teacher` directory (a path "
                                          "ending in .gguf may also be given as the teacher itself).")

    threads: int | None = threads_setting()

    def __post_init__(self):
        check_fields(self)
        if self.samples is not None and not 0 < self.samples <= MAX_SAMPLES:
            raise KDCacheError(f"`samples` must be between 1 and {MAX_SAMPLES}, got {self.samples}")
        if self.top_p is not None and self.top_p > 1:
            raise KDCacheError(f"`top_p` is a probability mass, at most 1, got {self.top_p}")
        if self.augment_methods is not None:
            parse_methods(self.augment_methods)
        if self.codec == "plain":
            compact_only = [f"`{name}` {value}" for name, value, plain in (
                ("logprob_dtype", self.logprob_dtype, self.logprob_dtype != "uint8"),
                ("top_p", self.top_p, self.top_p is None), ("targets", self.targets, self.targets != "head-tail"))
                if not plain]
            if compact_only:
                raise KDCacheError(f"{', '.join(compact_only)} needs `codec` compact (the plain format-1 layout "
                                   f"stores a fixed k of float log-probs)")

    def resolved(self, sampling_possible: bool) -> DumpSettings:
        """These settings with every default filled in; `sampling_possible` is False for classifiers.

        The causal-LM defaults are the best point of the measured frontier (docs/frontier.md). A classifier
        stores every label's probability in float16: a handful of labels costs little next to its
        input ids, and the frontier was not measured on classifiers.
        """
        targets = self.targets or ("head-tail" if sampling_possible and self.top_k is None and self.top_p is None
                                   else "topk")
        return dataclasses.replace(
            self, targets=targets, top_k=self.top_k or (4 if targets == "head-tail" else 64),
            samples=self.samples or (32 if targets == "head-tail" else 50),
            sampling=self.sampling or ("proportional" if targets == "head-tail" else "systematic"),
            logprob_dtype=self.logprob_dtype or ("uint8" if self.codec == "compact" and sampling_possible else "float16"))

    @property
    def target_types(self) -> tuple[str, ...]:
        return ("topk", "sampled") if self.targets == "both" else (self.targets,)

    @property
    def stored_codec(self) -> Codec:
        return Codec(layout=self.codec, logprobs=self.logprob_dtype, compression=self.compression,
                     draws_from="tail" if self.targets == "head-tail" else "teacher",
                     id_planes=self.codec == "compact" and bool({"sampled", "head-tail"} & set(self.target_types)))

    def content_settings(self) -> dict[str, Any]:
        """Settings that change the cache's bytes; the sampling ones only when something is sampled,
        so a top-k dump keeps the fingerprint it had before sampled targets existed."""
        settings = self.resume_settings()
        del settings["batch_size"], settings["shard_rows"], settings["fidelity_every"]
        if not {"sampled", "head-tail"} & set(self.target_types):
            del settings["targets"], settings["samples"], settings["seed"], settings["sampling"]
        elif self.sampling == "independent":  # as before systematic draws existed
            del settings["sampling"]
        if (self.codec, self.compression, self.top_p) == ("plain", "none", None):  # as before codecs existed
            del settings["codec"], settings["compression"], settings["top_p"]
        if self.task in (None, CAUSAL_LM):  # causal-LM fingerprints stay what they were before tasks existed
            for name in _CLASSIFICATION_SETTINGS:
                del settings[name]
        return settings

    def resume_settings(self) -> dict[str, Any]:
        """What a resumed dump must share with the interrupted one: the same rows, batched the same way."""
        settings = dataclasses.asdict(self)
        del settings["device_map"], settings["skip_nonfinite"], settings["fused_logits"]
        del settings["gguf_file"]  # which teacher: the manifest's teacher record (with the file's sha256) says it
        if not self.augment:  # caches without variants keep the fingerprints they had before augmentation existed
            del settings["augment"], settings["augment_methods"], settings["augment_rate"]
        del settings["threads"]  # how fast, not what
        return settings

    def augmentation(self, tagged: bool) -> Augmentation:
        """The variants to write; `tagged`: token classification data with gold tags (mentions can be swapped)."""
        methods = self.augment_methods or ("mentions,substitute" if tagged else "substitute")
        return Augmentation(self.augment, parse_methods(methods), self.augment_rate, self.seed)


@dataclasses.dataclass
class RecodeSettings:
    """The codec to recode into; None keeps the source's value."""

    targets: str | None = setting(None, "Target type to keep: topk, sampled, head-tail or both (default: the "
                                        "source's).", choices=("topk", "sampled", "both", "head-tail"))
    top_k: int | None = setting(None, "Keep at most this many ids per position (at most the source's k).",
                                positive=True)
    top_p: float | None = setting(None, "Mass-adaptive head: keep ids only until their mass reaches this.",
                                  positive=True)
    logprob_dtype: str = setting("uint8", "Storage type of the log-probs.", choices=LOGPROB_TYPES)
    codec: str = setting("compact", "Target layout.", choices=LAYOUTS)
    compression: str = setting("zstd", "Arrow IPC buffer compression.", choices=COMPRESSIONS)
    rank_ids: bool = setting(True, "Compact codec: number the ids by how often the cache lists them before gap "
                                   "coding, where that makes the cache smaller (format 4; lossless; 8-12% "
                                   "smaller caches of draws over real vocabularies).")

    threads: int | None = threads_setting()

    def __post_init__(self):
        check_fields(self)


_CLASSIFICATION_SETTINGS = ("task", "tokens_column", "labels_column", "label_column", "text_pair_column", "pooled")
