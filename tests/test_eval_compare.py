"""`kdcache eval`: checks the cache like train-student does, and compares several students in one table."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kdcache.cache.format import Manifest
from kdcache.cli import main
from kdcache.student.comparison import comparison_table


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def students(tmp_path_factory, cache_dir, student_config):
    root = tmp_path_factory.mktemp("students")
    for name, steps in (("one-step", 1), ("three-steps", 3)):
        result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", root / name,
                     "--max-steps", steps, "--batch-size", 4, "--lr", 1e-2, "--quiet")
        assert result.exit_code == 0, result.output
    return [root / "one-step", root / "three-steps"]


def test_one_table_compares_the_students_with_the_teacher(cache_dir, students):
    result = run("eval", "--cache", cache_dir, "--student", students[0], "--student", students[1], "--quiet")
    assert result.exit_code == 0, result.output
    header, columns, *rows = result.output.strip().splitlines()
    assert header.startswith("causal-lm:") and "positions" in header
    assert columns.split() == ["KL(T‖S)", "top-1", "agr", "NLL", "perplexity"]
    assert [row.split()[0] for row in rows] == ["teacher", str(students[0]), str(students[1])]
    teacher_nll = Manifest.load(cache_dir).stats["teacher_nll"]
    assert rows[0].split()[-4:] == ["-", "-", f"{teacher_nll:.4f}", f"{2.718281828459045 ** teacher_nll:.4f}"]


def test_json_lists_one_result_per_student(cache_dir, students):
    result = run("eval", "--cache", cache_dir, "--student", students[0], "--student", students[1], "--json", "--quiet")
    scores = json.loads(result.stdout)
    assert [score["student"] for score in scores] == [str(path) for path in students]
    assert all(0 <= score["top1_agreement"] <= 1 and score["kl_to_teacher"] > 0 for score in scores)
    assert scores[0]["kl_to_teacher"] != scores[1]["kl_to_teacher"]


def test_eval_refuses_a_cache_with_a_flipped_byte_unless_told_not_to_verify(tmp_path, cache_dir, students):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    shard = cache / Manifest.load(cache).shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the values: still readable Arrow
    shard.write_bytes(bytes(data))
    refused = run("eval", "--cache", cache, "--student", students[0], "--quiet")
    assert refused.exit_code == 1 and "fails its sha256 check" in refused.output, refused.output
    unverified = run("eval", "--cache", cache, "--student", students[0], "--no-verify", "--quiet")
    assert unverified.exit_code == 0, unverified.output


def test_classification_table_has_the_teacher_against_gold_and_each_student_against_both():
    scores = {"accuracy": 0.9, "entity_precision": 0.8, "entity_recall": 0.7, "entity_f1": 0.75, "entities": 12}
    result = {"task": "token-classification", "rows": 5, "targets": 40, "kl_to_teacher": 0.25,
              "student_vs_teacher": scores, "student_vs_gold": scores | {"accuracy": 0.85},
              "teacher_vs_gold": scores | {"accuracy": 0.95}}
    header, columns, teacher, student = comparison_table({"small": result}).splitlines()
    assert header == "token-classification: 5 rows, 40 targets"
    assert "acc vs T" in columns and "ent F1 vs gold" in columns and "entities" not in columns
    assert teacher.split() == ["teacher", "(cached)", "-", "-", "-", "-", "-",
                               "0.9500", "0.8000", "0.7000", "0.7500"]
    assert student.split() == ["small", "0.2500", "0.9000", "0.8000", "0.7000", "0.7500",
                               "0.8500", "0.8000", "0.7000", "0.7500"]
