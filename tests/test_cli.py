"""The command line: every user error is one line, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil

import click
import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from kdcache.cache.format import Manifest
from kdcache.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_user_error(result, fragment: str):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(message) == 1 and fragment in message[0], result.output


def test_dump_info_verify_train_eval(tmp_path, teacher_dir, corpus, student_config):
    cache = tmp_path / "cache"
    result = run("dump-teacher", "--teacher", teacher_dir, "--data", corpus, "--out", cache, "--top-k", 4,
                 "--hidden-layers", "-1", "--limit", 10)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "bytes/token" in result.output
    info = run("info", cache)
    assert info.exit_code == 0 and "top-4" in info.output and "hidden layers: 2" in info.output
    manifest = json.loads(run("info", cache, "--json").stdout)
    assert manifest["settings"]["top_k"] == 4 and manifest["dataset"]["rows_dumped"] == 10
    assert run("verify", cache).stdout.startswith("ok:")
    student = tmp_path / "student"
    result = run("train-student", "--cache", cache, "--student-config", student_config, "--out", student,
                 "--max-steps", 2, "--batch-size", 4, "--hidden-weight", 0.5, "--layer-map", "1:-1")
    assert result.exit_code == 0, result.output
    [scores] = json.loads(run("eval", "--cache", cache, "--student", student, "--json").stdout)
    assert 0 <= scores["top1_agreement"] <= 1 and scores["kl_to_teacher"] > 0


@pytest.fixture()
def cache_copy(tmp_path, cache_dir):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    return copy


def test_verify_catches_a_flipped_byte(cache_copy):
    shard = cache_copy / Manifest.load(cache_copy).shards[2].file
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10
    shard.write_bytes(bytes(data))
    assert_user_error(run("verify", cache_copy), "shard-00000-00002.arrow fails its sha256 check")


def test_verify_catches_a_missing_shard(cache_copy):
    (cache_copy / Manifest.load(cache_copy).shards[0].file).unlink()
    assert_user_error(run("verify", cache_copy), "shard-00000-00000.arrow is missing")


def _dump(teacher_dir, data, out, *extra):
    return run("dump-teacher", "--teacher", teacher_dir, "--data", data, "--out", out, *extra)


@pytest.mark.parametrize("case, fragment", [
    ("missing-teacher", "teacher tokenizer path not found"),
    ("missing-data", "data path not found"),
    ("missing-column", "text column 'body' not in dataset"),
    ("empty-data", "is empty"),
    ("topk-zero", "--top-k must be positive"),
    ("topk-too-large", "larger than the vocabulary (64 tokens)"),
    ("layer-out-of-range", "hidden layer 7 out of range"),
])
def test_dump_bad_input(tmp_path, teacher_dir, corpus, case, fragment):
    out = tmp_path / "out"
    args = {
        "missing-teacher": ("./no/such/teacher", corpus, ()),
        "missing-data": (teacher_dir, "./no/such/data.jsonl", ()),
        "missing-column": (teacher_dir, corpus, ("--text-column", "body")),
        "empty-data": (teacher_dir, tmp_path / "empty.jsonl", ()),
        "topk-zero": (teacher_dir, corpus, ("--top-k", 0)),
        "topk-too-large": (teacher_dir, corpus, ("--top-k", 65)),
        "layer-out-of-range": (teacher_dir, corpus, ("--hidden-layers", "7")),
    }[case]
    if case == "empty-data":
        write_jsonl(tmp_path / "empty.jsonl", [])
        (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(_dump(args[0], args[1], out, *args[2]), fragment)
    assert not out.exists(), "a refused dump leaves nothing behind"


def test_dump_refuses_an_output_holding_a_different_cache(cache_copy, teacher_dir, corpus):
    before = {path: path.stat().st_mtime_ns for path in cache_copy.rglob("*")}
    assert_user_error(_dump(teacher_dir, corpus, cache_copy, "--top-k", 5), "already holds a different cache")
    assert {path: path.stat().st_mtime_ns for path in cache_copy.rglob("*")} == before


def test_dump_refuses_a_non_empty_directory(tmp_path, teacher_dir, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_user_error(_dump(teacher_dir, corpus, tmp_path / "out"), "exists and is not empty")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_train_bad_input(tmp_path, cache_dir, student_config):
    common = ("--cache", cache_dir, "--out", tmp_path / "s", "--max-steps", 1)
    assert_user_error(run("train-student", *common), "give exactly one of --student")
    assert_user_error(run("train-student", *common, "--student", "./nope"), "student path not found")
    assert_user_error(run("train-student", "--cache", tmp_path / "nocache", "--out", tmp_path / "s",
                          "--student-config", student_config), "cache directory not found")
    assert_user_error(run("train-student", *common, "--student-config", student_config, "--hidden-weight", 1,
                          "--layer-map", "1:0"), "teacher layer 0 is not cached")
    assert not (tmp_path / "s").exists()


def test_info_on_a_directory_that_is_not_a_cache(tmp_path):
    assert_user_error(run("info", tmp_path), "not a kdcache cache")


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {param.opts[0]}" for name, command in main.commands.items() for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing, missing
