"""Reruns are safe in scripts: a finished dump rerun is a no-op that succeeds, and train-student only
replaces an earlier student when asked to, never a directory kdcache did not write."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kdcache.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_rerunning_a_finished_dump_succeeds_and_writes_nothing(tmp_path, teacher_dir, corpus):
    cache = tmp_path / "cache"
    args = ("dump-teacher", "--teacher", teacher_dir, "--data", corpus, "--out", cache, "--top-k", 4, "--limit", 6)
    assert run(*args).exit_code == 0
    before = {path: path.stat().st_mtime_ns for path in cache.rglob("*")}
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert "cache complete, nothing to do" in again.output
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*")} == before


def test_train_student_replaces_an_earlier_student_only_with_overwrite(tmp_path, cache_dir, student_config):
    out = tmp_path / "student"
    train = ("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", out,
             "--max-steps", 1, "--batch-size", 4)
    assert run(*train).exit_code == 0
    first = json.loads((out / "kdcache_training.json").read_text())["settings"]["lr"]
    refused = run(*train, "--lr", 1e-3)
    assert refused.exit_code == 1 and "pass --overwrite to replace" in refused.output
    replaced = run(*train, "--lr", 1e-3, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "kdcache_training.json").read_text())["settings"]["lr"] == 1e-3 != first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]


def test_overwrite_never_deletes_a_directory_kdcache_did_not_write(tmp_path, cache_dir, student_config):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", out,
                 "--max-steps", 1, "--overwrite")
    assert result.exit_code == 1 and "was not written by kdcache" in result.output
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "results.partial").exists()
