"""Entity-level precision, recall and F1 for IOB2 (BIO) tag sequences, with seqeval's conventions.

seqeval is the reference every NER paper's CoNLL-2003 F1 comes from, but it is one more
dependency for forty lines; this module reproduces its default (non-strict) mode: a chunk starts
at B-X, and also at an I-X that follows O or a tag of another type (a "stray" I- opens a chunk
rather than being dropped); it ends before O, B-, or a change of type. E-/S- (IOBES) follow
seqeval's rules too. Scores are micro-averaged over all entities of all sentences: an entity
counts as correct only when its type, start and end all match.
"""

from __future__ import annotations

import re

_TAGGED = re.compile(r"^[BIES]-.+$")


def is_entity_scheme(labels: list[str]) -> bool:
    """True when every label is 'O' or PREFIX-TYPE with PREFIX in B/I/E/S: entity scores make sense."""
    return any(label != "O" for label in labels) and all(label == "O" or _TAGGED.match(label) for label in labels)


def _split(label: str) -> tuple[str, str]:
    if label == "O":
        return "O", ""
    prefix, _, kind = label.partition("-")
    return prefix, kind


def _ends(previous_tag: str, tag: str, previous_type: str, kind: str) -> bool:
    if previous_tag in ("E", "S"):
        return True
    if previous_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return previous_tag != "O" and previous_type != kind


def _starts(previous_tag: str, tag: str, previous_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if tag in ("E", "I") and previous_tag in ("E", "S", "O"):
        return True
    return tag != "O" and previous_type != kind


def entity_spans(labels: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence as (type, first index, last index), both ends inclusive."""
    spans = set()
    previous_tag, previous_type, begin = "O", "", 0
    for index, label in enumerate([*labels, "O"]):
        tag, kind = _split(label)
        if _ends(previous_tag, tag, previous_type, kind) and previous_tag != "O":
            spans.add((previous_type, begin, index - 1))
        if _starts(previous_tag, tag, previous_type, kind):
            begin = index
        previous_tag, previous_type = tag, kind
    return spans


def entity_scores(truth: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities (0 where undefined, as seqeval reports them)."""
    correct = true_count = predicted_count = 0
    for true_labels, predicted_labels in zip(truth, predicted, strict=True):
        true_spans, predicted_spans = entity_spans(true_labels), entity_spans(predicted_labels)
        correct += len(true_spans & predicted_spans)
        true_count += len(true_spans)
        predicted_count += len(predicted_spans)
    precision = correct / predicted_count if predicted_count else 0.0
    recall = correct / true_count if true_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "entities": true_count}
