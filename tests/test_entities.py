"""Entity scores for IOB2-tagged token classification: spans and precision/recall/F1 as seqeval computes them."""

from __future__ import annotations

import pytest

from conftest import NER_LABELS
from kdcache.student.entities import entity_scores, entity_spans, is_entity_scheme


@pytest.mark.parametrize("labels, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
    (["O", "I-PER", "I-PER", "O"], {("PER", 1, 2)}),                      # a stray I- opens an entity
    (["B-PER", "B-PER", "I-PER"], {("PER", 0, 0), ("PER", 1, 2)}),        # B- always starts a new one
    (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2)}),        # a type change splits
    (["I-LOC"], {("LOC", 0, 0)}),
    (["B-LOC", "I-LOC"], {("LOC", 0, 1)}),                                # an entity at the end is closed
    (["O", "O"], set()),
])
def test_entity_spans_follow_seqeval(labels, spans):
    assert entity_spans(labels) == spans


def test_entity_scores_by_hand():
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    # sentence 1: PER right, LOC cut short to nothing; sentence 2: LOC right plus a spurious PER
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "B-PER"]]
    scores = entity_scores(truth, predicted)
    assert scores["entities"] == 3
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    # a boundary error is wrong as a whole, and no prediction at all scores 0 (not NaN)
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    assert entity_scores([["B-PER"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "entities": 1}


def test_entity_scheme_detection():
    assert is_entity_scheme(NER_LABELS)
    assert not is_entity_scheme(["NOUN", "VERB"]) and not is_entity_scheme(["O"])
