"""What differs between distillation tasks, so the dump, training and evaluation loops do not.

A cache row always holds the tokens the teacher saw (`input_ids` [L], and hidden states per
token); the *targets* (top-k class ids and log-probs, tail, gold labels) sit at the task's target
positions, and range over the task's classes:

| task | model class | classes | targets at |
|---|---|---|---|
| `causal-lm` | AutoModelForCausalLM | tokenizer vocabulary | every position t (the token after t) |
| `token-classification` | AutoModelForTokenClassification | config.id2label | the first sub-token of each word |
| `sequence-classification` | AutoModelForSequenceClassification | config.id2label | position 0 (one target per row) |

Classification targets are the **full** distribution when there are at most
`FULL_DISTRIBUTION_MAX_LABELS` labels (k = number of labels, tail = -inf), and the usual top-k +
exact tail above that. Token classification puts each word's target on its first sub-token (the
convention of BERT's CoNLL-2003 recipe and Hugging Face's `run_ner`); the other sub-tokens,
special tokens and padding carry no target and enter no loss or metric, but still have hidden
states for feature matching. Sequence classification's target is stored at position 0, the token
BERT-style classifiers pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from .errors import KDCacheError

CAUSAL_LM = "causal-lm"
TOKEN_CLASSIFICATION = "token-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"
FULL_DISTRIBUTION_MAX_LABELS = 256
IGNORE_LABEL = -100


@dataclasses.dataclass
class Annotation:
    """What a classification row carries beyond its tokens (numpy arrays, as cached)."""

    target_positions: np.ndarray          # int32 [T], ascending
    labels: np.ndarray | None = None      # int32 [T], gold class per target
    token_type_ids: np.ndarray | None = None  # int8 [L], text pairs only


class Task:
    """The causal-LM task; the classification tasks below override what differs."""

    name = CAUSAL_LM
    auto_class_name = "AutoModelForCausalLM"
    architecture_suffixes: tuple[str, ...] = ("ForCausalLM", "LMHeadModel")

    @property
    def auto_class(self):
        """The transformers Auto class for this task (imported on use: the CLI starts without transformers)."""
        import transformers
        return getattr(transformers, self.auto_class_name)

    def class_names(self, config) -> list[str]:
        """Class names by id; empty when the classes are the tokenizer's vocabulary."""
        return []

    def top_k(self, requested: int, num_classes: int) -> int:
        return requested

    def target_logits(self, logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor,
                      annotations: list[Annotation] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits at the target positions [N, C] and the gold class at each (-1: none)."""
        next_ids = torch.full_like(input_ids, -1)
        next_ids[:, :-1] = torch.where(valid[:, 1:], input_ids[:, 1:], -1)
        return logits[valid], next_ids[valid]

    def student_logits(self, logits: torch.Tensor, batch, num_classes: int) -> torch.Tensor:
        """Student logits [N, C] in the order of `batch.sparse_targets()`."""
        return logits[batch.valid][:, :num_classes]

    def gold_labels(self, batch) -> torch.Tensor:
        """Gold class per target [N] for the cross-entropy term (-100: none)."""
        return batch.next_token_labels()

    def check_gold_labels(self, manifest) -> None:
        """Raise unless the cache has what `gold_labels` needs (the text is its own label for a causal LM)."""

    def check_student(self, model, manifest) -> None:
        """Raise unless the student's output can represent the cache's classes."""
        from .models import output_vocab_size
        if output_vocab_size(model) < manifest.vocab_size:
            raise KDCacheError(f"student vocabulary ({output_vocab_size(model)}) is smaller than the cache's "
                               f"tokenizer ({manifest.vocab_size} tokens): the student cannot represent the "
                               f"teacher's targets")

    def student_config_overrides(self, manifest) -> dict:
        """Config values a fresh student must take from the cache."""
        return {}


class _Classification(Task):
    """Shared by both classification tasks: the classes are the teacher's labels."""

    def class_names(self, config) -> list[str]:
        return [str(config.id2label[index]) for index in range(config.num_labels)]

    def top_k(self, requested: int, num_classes: int) -> int:
        return num_classes if num_classes <= FULL_DISTRIBUTION_MAX_LABELS else min(requested, num_classes)

    def target_logits(self, logits, input_ids, valid, annotations):
        where = target_mask(annotations, input_ids.shape, logits.device)
        gold = torch.full(input_ids.shape, -1, dtype=torch.long, device=logits.device)
        if annotations[0].labels is not None:
            labels = np.concatenate([annotation.labels for annotation in annotations]).astype(np.int64)
            gold[where] = torch.from_numpy(labels).to(gold.device)
        return self.logits_at(logits, where), gold[where]

    def logits_at(self, logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return logits[where]

    def student_logits(self, logits, batch, num_classes):
        return self.logits_at(logits, batch.targets_at)

    def gold_labels(self, batch) -> torch.Tensor:
        return batch.labels[batch.targets_at]

    def check_gold_labels(self, manifest) -> None:
        if "labels" not in manifest.optional_columns:
            raise KDCacheError("--ce-weight > 0 but the cache holds no gold labels (dump data with a label column)")

    def check_student(self, model, manifest) -> None:
        names = self.class_names(model.config)
        if len(names) != len(manifest.labels) or not (generic_names(names) or names == manifest.labels):
            raise KDCacheError(f"student labels ({', '.join(names)}) differ from the cache's "
                               f"({', '.join(manifest.labels)})")
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < manifest.vocab_size:
            raise KDCacheError(f"student vocabulary ({rows}) is smaller than the cache's tokenizer "
                               f"({manifest.vocab_size} tokens)")

    def student_config_overrides(self, manifest) -> dict:
        return {"num_labels": len(manifest.labels), "id2label": dict(enumerate(manifest.labels)),
                "label2id": {name: index for index, name in enumerate(manifest.labels)}}


class TokenClassification(_Classification):
    name = TOKEN_CLASSIFICATION
    auto_class_name = "AutoModelForTokenClassification"
    architecture_suffixes = ("ForTokenClassification",)

    def batches(self, rows, rows_range, tokenizer, classes, settings, source):
        return token_classification_batches(rows, rows_range, tokenizer, classes, settings, source)


class SequenceClassification(_Classification):
    name = SEQUENCE_CLASSIFICATION
    auto_class_name = "AutoModelForSequenceClassification"
    architecture_suffixes = ("ForSequenceClassification",)

    def batches(self, rows, rows_range, tokenizer, classes, settings, source):
        return sequence_classification_batches(rows, rows_range, tokenizer, classes, settings, source)

    def logits_at(self, logits, where):
        """The model gives one row of logits per sequence; each sequence has its one target at position 0."""
        return logits[where.any(dim=1)]


TASKS = {task.name: task for task in (Task(), TokenClassification(), SequenceClassification())}


def generic_names(names: list[str]) -> bool:
    """True for transformers' placeholder names (LABEL_0, LABEL_1, ...): the ids carry no names to check."""
    return all(name == f"LABEL_{index}" for index, name in enumerate(names))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KDCacheError(f"unknown task '{name}' (expected one of {', '.join(TASKS)})")
    return TASKS[name]


def infer_task(config) -> Task:
    """The task a model's `architectures` name, when they name exactly one; a config without any is a causal LM
    (what kdcache assumed before tasks existed)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        return TASKS[CAUSAL_LM]
    found = {task.name for architecture in architectures for task in TASKS.values()
             if architecture.endswith(task.architecture_suffixes)}
    if len(found) != 1:
        raise KDCacheError(f"cannot infer the task from the teacher's architectures ({', '.join(architectures)}); "
                           f"pass --task {'|'.join(TASKS)}")
    return TASKS[found.pop()]


def resolve_task(name: str | None, teacher: str):
    """(task, config): `name` if given, else inferred from the teacher's config."""
    from .models import load_config
    config = load_config(teacher, "teacher config")
    return (get_task(name) if name else infer_task(config)), config


def pooler(model):
    """The encoder's pooler (BERT-style: dense + tanh on the first token), or a one-line error."""
    module = getattr(model.base_model, "pooler", None)
    if module is None:
        raise KDCacheError(f"{type(model).__name__} has no pooler (pooled output exists for BERT-style "
                           f"sequence classifiers and bare encoders)")
    return module


def target_mask(annotations: list[Annotation], shape: tuple[int, int], device) -> torch.Tensor:
    """bool [B, L]: True where a row has a target."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, annotation in enumerate(annotations):
        mask[row, torch.from_numpy(annotation.target_positions.astype(np.int64))] = True
    return mask.to(device)


# --------------------------------------------------------------------------- reading labelled data


def _label_feature_names(feature) -> list[str] | None:
    """Names of a `ClassLabel` feature, also inside a sequence feature; None for plain ints/strings."""
    import datasets
    inner = getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def label_encoder(feature, classes: list[str], column: str):
    """A function mapping one dataset label (int id, string name, or ClassLabel id) to the teacher's id.

    ClassLabel ids are translated through their names when the teacher has named labels, so a
    dataset and a teacher that order the same labels differently still line up.
    """
    label2id = {name: index for index, name in enumerate(classes)}
    names = _label_feature_names(feature)
    generic = generic_names(classes)
    if names is not None and not generic:
        missing = sorted(set(names) - set(classes))
        if missing:
            raise KDCacheError(f"labels {missing} of column '{column}' are not among the teacher's labels "
                               f"({', '.join(classes)})")

    def encode(value) -> int:
        if isinstance(value, str):
            if value not in label2id:
                raise KDCacheError(f"label '{value}' in column '{column}' is not one of the teacher's labels "
                                   f"({', '.join(classes)})")
            return label2id[value]
        if names is not None and not generic:
            return label2id[names[value]]
        if not 0 <= int(value) < len(classes):
            raise KDCacheError(f"label {value} in column '{column}' is out of range: the teacher has "
                               f"{len(classes)} labels")
        return int(value)

    return encode


def _require_column(rows, column: str, flag: str, source: str) -> None:
    if column not in rows.column_names:
        raise KDCacheError(f"column '{column}' not in dataset {source} (columns: {', '.join(rows.column_names)}); "
                           f"pass {flag}")


def _optional_label_column(rows, column: str | None, default: str, flag: str, source: str):
    """The label column: the one named (must exist), else `default` when present, else None (no gold labels)."""
    if column is not None:
        _require_column(rows, column, flag, source)
        return column
    return default if default in rows.column_names else None


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise KDCacheError("token classification needs a fast tokenizer (word_ids() aligns words and sub-tokens)")


def token_classification_batches(rows, rows_range: range, tokenizer, classes: list[str], settings, source: str
                                 ) -> Iterator[tuple[list[int], list[list[int]], list[Annotation]]]:
    """Yield (sample_ids, token id lists, annotations) per batch of `rows_range` from word lists and per-word labels.

    Each word's target sits on its first sub-token (`word_ids()` of the fast tokenizer); words
    cut off by `max_length` get none, and rows with no word left are skipped.
    """
    _check_fast(tokenizer)
    _require_column(rows, settings.tokens_column, "--tokens-column", source)
    labels_column = _optional_label_column(rows, settings.labels_column, "ner_tags", "--labels-column", source)
    encode = labels_column and label_encoder(rows.features[labels_column], classes, labels_column)
    for start in range(rows_range.start, rows_range.stop, settings.batch_size):
        chunk = rows[start:min(start + settings.batch_size, rows_range.stop)]
        words = chunk[settings.tokens_column]
        if any(not isinstance(row, list) or any(not isinstance(word, str) for word in row) for row in words):
            raise KDCacheError(f"column '{settings.tokens_column}' must hold lists of words (strings)")
        encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=settings.max_length)
        sample_ids, token_lists, annotations = [], [], []
        for offset, row_words in enumerate(words):
            word_ids = encoding.word_ids(offset)
            positions = [t for t, word in enumerate(word_ids)
                         if word is not None and (t == 0 or word_ids[t - 1] != word)]
            if not positions:
                continue
            labels = None
            if labels_column:
                row_labels = chunk[labels_column][offset]
                if len(row_labels) != len(row_words):
                    raise KDCacheError(f"row {start + offset}: {len(row_words)} words but {len(row_labels)} labels")
                labels = np.array([encode(row_labels[word_ids[t]]) for t in positions], dtype=np.int32)
            sample_ids.append(start + offset)
            token_lists.append(encoding["input_ids"][offset])
            annotations.append(Annotation(np.array(positions, dtype=np.int32), labels))
        if sample_ids:
            yield sample_ids, token_lists, annotations


def sequence_classification_batches(rows, rows_range: range, tokenizer, classes: list[str], settings, source: str
                                    ) -> Iterator[tuple[list[int], list[list[int]], list[Annotation]]]:
    """Yield (sample_ids, token id lists, annotations) per batch of `rows_range` from a text (+ pair) and a label
    column."""
    _require_column(rows, settings.text_column, "--text-column", source)
    if settings.text_pair_column is not None:
        _require_column(rows, settings.text_pair_column, "--text-pair-column", source)
    label_column = _optional_label_column(rows, settings.label_column, "label", "--label-column", source)
    encode = label_column and label_encoder(rows.features[label_column], classes, label_column)
    for start in range(rows_range.start, rows_range.stop, settings.batch_size):
        chunk = rows[start:min(start + settings.batch_size, rows_range.stop)]
        texts = chunk[settings.text_column]
        pairs = chunk[settings.text_pair_column] if settings.text_pair_column else None
        if any(not isinstance(text, str) for text in texts + (pairs or [])):
            raise KDCacheError(f"text columns must hold strings (row {start} onwards does not)")
        encoding = tokenizer(texts, pairs, truncation=True, max_length=settings.max_length)
        annotations = []
        for offset in range(len(texts)):
            labels = np.array([encode(chunk[label_column][offset])], dtype=np.int32) if label_column else None
            segments = (np.array(encoding["token_type_ids"][offset], dtype=np.int8)
                        if pairs is not None and "token_type_ids" in encoding else None)
            annotations.append(Annotation(np.zeros(1, dtype=np.int32), labels, segments))
        yield list(range(start, start + len(texts))), encoding["input_ids"], annotations


def dataset_columns(task: Task, settings) -> dict:
    """The columns a classification dump reads, for the manifest (nothing for a causal LM)."""
    if task.name == TOKEN_CLASSIFICATION:
        return {"tokens_column": settings.tokens_column, "labels_column": settings.labels_column}
    if task.name == SEQUENCE_CLASSIFICATION:
        return {"text_pair_column": settings.text_pair_column, "label_column": settings.label_column}
    return {}

