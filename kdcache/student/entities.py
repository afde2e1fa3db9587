"""Entity-level precision, recall and F1 for IOB2 (BIO) tag sequences, computed by seqeval.

seqeval is the reference every NER paper's CoNLL-2003 F1 comes from, so the scores are its own,
in its default (conlleval-compatible, non-strict) mode: a chunk starts at B-X, and also at an I-X
that follows O or a tag of another type (a "stray" I- opens a chunk rather than being dropped); it
ends before O, B-, or a change of type; E-/S- (IOBES) follow its rules too. Scores are
micro-averaged over all entities of all sentences: an entity counts as correct only when its type,
start and end all match; where a ratio is undefined it is 0, as seqeval reports it.
"""

from __future__ import annotations

import re

from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

_TAGGED = re.compile(r"^[BIES]-.+$")


def is_entity_scheme(labels: list[str]) -> bool:
    """True when every label is 'O' or PREFIX-TYPE with PREFIX in B/I/E/S: entity scores make sense."""
    return any(label != "O" for label in labels) and all(label == "O" or _TAGGED.match(label) for label in labels)


def entity_spans(labels: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence as (type, first index, last index), both ends inclusive."""
    return set(get_entities(list(labels)))


def entity_scores(truth: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities, and the number of true entities."""
    return {"precision": float(precision_score(truth, predicted, zero_division=0)),
            "recall": float(recall_score(truth, predicted, zero_division=0)),
            "f1": float(f1_score(truth, predicted, zero_division=0)),
            "entities": sum(len(entity_spans(labels)) for labels in truth)}
