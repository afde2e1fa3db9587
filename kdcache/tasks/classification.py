"""Token and sequence classification: the classes are the teacher's labels.

Classification targets are the **full** distribution when there are at most
`FULL_DISTRIBUTION_MAX_LABELS` labels (k = number of labels, tail = -inf), and the usual top-k +
exact tail above that. Token classification puts each word's target on its first sub-token (the
convention of BERT's CoNLL-2003 recipe and Hugging Face's `run_ner`); the other sub-tokens,
special tokens and padding carry no target and enter no loss or metric, but still have hidden
states for feature matching. Sequence classification's target is stored at position 0, the token
BERT-style classifiers pool.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import KDCacheError
from .base import Annotation, Task, TokenizedBatch, generic_names, target_mask
from .names import FULL_DISTRIBUTION_MAX_LABELS, IGNORE_LABEL, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from .labels import label_encoder, optional_label_column, require_column


class _Classification(Task):
    """Shared by both classification tasks: the classes are the teacher's labels."""

    supports_sampled_targets = False
    classes_are_vocabulary = False

    def class_names(self, config) -> list[str]:
        return [str(config.id2label[index]) for index in range(config.num_labels)]

    def top_k(self, requested: int, num_classes: int) -> int:
        return num_classes if num_classes <= FULL_DISTRIBUTION_MAX_LABELS else min(requested, num_classes)

    def teacher_output_size(self, model) -> int:
        """A classifier's output rows are its labels; the manifest records the input vocabulary instead."""
        return model.config.vocab_size

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
            raise KDCacheError("`ce_weight` > 0 but the cache holds no gold labels (dump data with a label column)")

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

    def check_rows(self, rows, settings, source: str) -> None:
        if len(rows) == 0:
            raise KDCacheError(f"dataset {source} is empty")


class TokenClassification(_Classification):
    name = TOKEN_CLASSIFICATION
    auto_class_name = "AutoModelForTokenClassification"
    architecture_suffixes = ("ForTokenClassification",)

    def dataset_columns(self, settings) -> dict:
        return {"tokens_column": settings.tokens_column, "labels_column": settings.labels_column}

    def batches(self, rows, rows_range: range, tokenizer, classes: list[str], settings, source: str
                ) -> Iterator[TokenizedBatch]:
        """Batches of `rows_range` from word lists and per-word labels.

        Each word's target sits on its first sub-token (`word_ids()` of the fast tokenizer); words
        cut off by `max_length` get none, and rows with no word left are skipped. A row whose labels
        are null (partly labelled data: gold sentences plus raw text for the teacher to label) gets
        the teacher's targets and IGNORE_LABEL as gold, which the CE term and the gold metrics skip.
        """
        if not getattr(tokenizer, "is_fast", False):
            raise KDCacheError("token classification needs a fast tokenizer (word_ids() aligns words and sub-tokens)")
        require_column(rows, settings.tokens_column, "tokens_column", source)
        labels_column = optional_label_column(rows, settings.labels_column, "ner_tags", "labels_column", source)
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
                    if row_labels is None:  # an unlabelled row of partly labelled data: targets, no gold
                        labels = np.full(len(positions), IGNORE_LABEL, dtype=np.int32)
                    elif len(row_labels) != len(row_words):
                        raise KDCacheError(f"row {start + offset}: {len(row_words)} words but {len(row_labels)} labels")
                    else:
                        labels = np.array([encode(row_labels[word_ids[t]]) for t in positions], dtype=np.int32)
                sample_ids.append(start + offset)
                token_lists.append(encoding["input_ids"][offset])
                annotations.append(Annotation(np.array(positions, dtype=np.int32), labels))
            if sample_ids:
                yield sample_ids, token_lists, annotations

    def drop_reason(self, row: dict, settings) -> str:
        return "no word to classify" if not row[settings.tokens_column] else "no word left after tokenization"


class SequenceClassification(_Classification):
    name = SEQUENCE_CLASSIFICATION
    auto_class_name = "AutoModelForSequenceClassification"
    architecture_suffixes = ("ForSequenceClassification",)

    def dataset_columns(self, settings) -> dict:
        return {"text_pair_column": settings.text_pair_column, "label_column": settings.label_column}

    def logits_at(self, logits, where):
        """The model gives one row of logits per sequence; each sequence has its one target at position 0."""
        return logits[where.any(dim=1)]

    def batches(self, rows, rows_range: range, tokenizer, classes: list[str], settings, source: str
                ) -> Iterator[TokenizedBatch]:
        """Batches of `rows_range` from a text (+ pair) and a label column."""
        require_column(rows, settings.text_column, "text_column", source)
        if settings.text_pair_column is not None:
            require_column(rows, settings.text_pair_column, "text_pair_column", source)
        label_column = optional_label_column(rows, settings.label_column, "label", "label_column", source)
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
