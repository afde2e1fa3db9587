"""The defaults are the sweep's recipe (docs/train.md, "Defaults"): the learning rate a student gets when
the user gives none is resolved for its width in one place, recorded, printed once, and the same for
`train_student`, the CLI and `DistillationTrainer`; an explicit learning rate is kept."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM

import kdcache
from kdcache.cli import main

# The rule of docs/train.md: 1e-2 for a fresh student 64 wide, 2e-3 for a pretrained one, scaled by 64 / width.
FRESH_16_WIDE = 4e-2
FRESH_32_WIDE = 2e-2
PRETRAINED_32_WIDE = 4e-3


def record(out) -> dict:
    return json.loads((out / "kdcache_training.json").read_text())


def test_a_student_without_lr_gets_its_widths_default_recorded_with_the_reason(cache_dir, student_config, tmp_path):
    summary = kdcache.train_student(cache_dir, tmp_path / "s", student_config=str(student_config),
                                    settings=kdcache.TrainSettings(max_steps=4, batch_size=4, log_every=1),
                                    progress=False)
    written = record(tmp_path / "s")
    assert written["settings"]["lr"] == pytest.approx(FRESH_16_WIDE)
    assert written["summary"]["defaults"] == summary["defaults"] == {"lr": "lr 4.0e-02 (default for a fresh 16-wide student)"}
    first = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(FRESH_16_WIDE * 0.5 * (1 + math.cos(math.pi / 4))), "no warm-up step in 4; cosine"


def test_a_pretrained_student_gets_the_smaller_pretrained_default(cache_dir, teacher_dir, tmp_path):
    summary = kdcache.train_student(cache_dir, tmp_path / "s", student=str(teacher_dir),
                                    settings=kdcache.TrainSettings(max_steps=1, batch_size=4), progress=False)
    assert record(tmp_path / "s")["settings"]["lr"] == pytest.approx(PRETRAINED_32_WIDE)
    assert summary["defaults"] == {"lr": "lr 4.0e-03 (default for a pretrained 32-wide student)"}


def test_an_explicit_lr_is_kept_and_no_default_is_recorded(cache_dir, student_config, tmp_path):
    summary = kdcache.train_student(cache_dir, tmp_path / "s", student_config=str(student_config),
                                    settings=kdcache.TrainSettings(max_steps=1, batch_size=4, lr=2e-4), progress=False)
    written = record(tmp_path / "s")
    assert written["settings"]["lr"] == 2e-4
    assert "defaults" not in summary and "defaults" not in written["summary"]


def test_the_cli_prints_the_resolved_default_once(cache_dir, student_config, tmp_path):
    result = CliRunner().invoke(main, ["train-student", "--cache", str(cache_dir), "--student-config",
                                       str(student_config), "--out", str(tmp_path / "s"), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("lr 4.0e-02 (default for a fresh 16-wide student)") == 1
    explicit = CliRunner().invoke(main, ["train-student", "--cache", str(cache_dir), "--student-config",
                                         str(student_config), "--out", str(tmp_path / "e"), "--max-steps", "1",
                                         "--lr", "1e-3"])
    assert explicit.exit_code == 0 and "default for" not in explicit.output


def test_the_trainer_gets_train_students_recipe_for_the_same_student(cache_dir, teacher_dir, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=32, layers=1))
    settings = kdcache.TrainSettings(max_steps=3, seed=4)
    trainer = kdcache.DistillationTrainer(model=model, cache=cache_dir, settings=settings)
    args = trainer.args
    assert args.learning_rate == pytest.approx(FRESH_32_WIDE)
    assert (args.lr_scheduler_type, args.warmup_steps, args.max_steps, args.seed) == ("cosine", 0, 3, 4)  # int(0.05 · 3), as train-student
    assert (args.per_device_train_batch_size, args.weight_decay) == (settings.batch_size, settings.weight_decay)
    pretrained = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert kdcache.training_arguments(pretrained, output_dir=str(tmp_path / "p")).learning_rate == \
        pytest.approx(PRETRAINED_32_WIDE)
    explicit = kdcache.training_arguments(model, kdcache.TrainSettings(lr=1e-4), str(tmp_path / "t"), logging_steps=7)
    assert (explicit.learning_rate, explicit.logging_steps) == (1e-4, 7)
