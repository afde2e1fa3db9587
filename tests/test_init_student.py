"""init-student: a smaller student carved from the teacher's own layers (encoders and causal LMs)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from conftest import tiny_bert
from kdcache.errors import KDCacheError


def test_init_student_carves_layers_from_the_teacher(tmp_path, wordpiece):
    from kdcache.student import init_student
    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    teacher = AutoModelForTokenClassification.from_config(tiny_bert(wordpiece, layers=4, num_labels=5))
    teacher.save_pretrained(teacher_dir)
    wordpiece.save_pretrained(teacher_dir)
    record = init_student(str(teacher_dir), tmp_path / "carved", [0, 3])
    student = AutoModelForTokenClassification.from_pretrained(tmp_path / "carved")
    assert record["mode"] == "carve" and student.config.num_hidden_layers == 2
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for name in ("bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert torch.equal(student_state[name], teacher_state[name])
    for student_layer, teacher_layer in ((0, 0), (1, 3)):
        for suffix in ("attention.self.query.weight", "output.dense.weight"):
            assert torch.equal(student_state[f"bert.encoder.layer.{student_layer}.{suffix}"],
                               teacher_state[f"bert.encoder.layer.{teacher_layer}.{suffix}"])
    assert AutoTokenizer.from_pretrained(tmp_path / "carved").get_vocab() == wordpiece.get_vocab()

    init_student(str(teacher_dir), tmp_path / "narrow", [0, 1], hidden_size=16)
    narrow = AutoModelForTokenClassification.from_pretrained(tmp_path / "narrow")
    assert (narrow.config.hidden_size, narrow.config.num_attention_heads, narrow.config.num_hidden_layers) == (16, 2, 2)
    assert narrow.config.intermediate_size == 32 and narrow.config.num_labels == 5

    for layers, fragment in (([4], "need distinct teacher layers in 0..3"), ([], "at least one layer")):
        with pytest.raises(KDCacheError, match=fragment):
            init_student(str(teacher_dir), tmp_path / "bad", layers)
    with pytest.raises(KDCacheError, match="not a multiple of the teacher's attention head size"):
        init_student(str(teacher_dir), tmp_path / "bad", [0], hidden_size=12)
    assert not (tmp_path / "bad").exists()


def test_init_student_carves_a_causal_lm(tmp_path, teacher_dir):
    from transformers import AutoModelForCausalLM
    from kdcache.student import init_student
    init_student(str(teacher_dir), tmp_path / "student", [1])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 1
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
