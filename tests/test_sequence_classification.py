"""Sequence classification of text pairs: the cache (token types, pooled output, one target per row)
equals a direct forward, and a student trains and evaluates on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import PEOPLE, PLACES, tiny_bert, write_rows
from kdcache import open_cache
from kdcache.student import TrainSettings, evaluate, train_student
from kdcache.teacher import DumpSettings, dump_teacher


@pytest.mark.slow
def test_sequence_classification_pairs_equal_a_direct_forward(tmp_path, wordpiece):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    AutoModelForSequenceClassification.from_config(tiny_bert(wordpiece, num_labels=3)).save_pretrained(teacher)
    wordpiece.save_pretrained(teacher)
    rows = [{"premise": f"{person[0]} visited {place[0]}", "hypothesis": f"{place[0]} is unbelievably big",
             "gold": index % 3} for index, (person, place) in enumerate(zip(PEOPLE * 2, PLACES * 2))]
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    settings = DumpSettings(text_column="premise", text_pair_column="hypothesis", label_column="gold", batch_size=3,
                            pooled=True)
    manifest = dump_teacher(str(teacher), str(data), tmp_path / "cache", settings, progress=False)
    assert manifest.task == "sequence-classification" and manifest.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert set(manifest.optional_columns) == {"token_type_ids", "target_positions", "labels"}
    assert manifest.pooled_size == 32
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    for sequence in open_cache(tmp_path / "cache").sequences():
        row = rows[sequence.sample_id]
        encoding = wordpiece(row["premise"], row["hypothesis"], return_tensors="pt")
        assert sequence.token_type_ids.tolist() == encoding["token_type_ids"][0].tolist()
        assert 1 in sequence.token_type_ids.tolist()
        with torch.no_grad():
            output = model(**encoding, output_hidden_states=True)
            expected = torch.log_softmax(output.logits[0].double(), dim=-1).numpy()
            np.testing.assert_allclose(sequence.pooled.astype(np.float32),
                                       model.bert.pooler(output.hidden_states[-1]).numpy(), atol=2e-3)
        assert sequence.target_positions.tolist() == [0] and sequence.labels.tolist() == [row["gold"]]
        np.testing.assert_allclose(expected[sequence.topk_ids[0].astype(np.int64)],
                                   sequence.topk_logprobs[0].astype(np.float64), rtol=1e-3, atol=2e-3)
    student = tmp_path / "student"
    train_student(tmp_path / "cache", student, student=str(teacher), progress=False,
                  settings=TrainSettings(max_steps=2, batch_size=4, ce_weight=0.5, pooled_weight=1.0, log_every=1))
    record = json.loads((student / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss"] == pytest.approx(record["kd"] + 0.5 * record["ce"] + record["pooled"], rel=1e-6)
    scores = evaluate(AutoModelForSequenceClassification.from_pretrained(student), tmp_path / "cache")
    assert {"student_vs_teacher", "student_vs_gold", "teacher_vs_gold"} <= set(scores)
    assert "entity_f1" not in scores["student_vs_teacher"]
