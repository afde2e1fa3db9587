"""A cache explains itself to the team that receives it: which rows the dump dropped and why, and
what teacher and data made it, named so that the names mean something on another machine."""

from __future__ import annotations

import hashlib
import os
import shutil

from click.testing import CliRunner
from conftest import LANGUAGE

from kdcache.cache.format import Manifest
from kdcache.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_blank_lines_of_a_text_corpus_are_counted_listed_and_explained(tmp_path, teacher_dir):
    sentences = LANGUAGE.sentences(12, min_words=4, max_words=10, seed=3)
    lines = []
    for index, sentence in enumerate(sentences):
        lines += [sentence, "", "   "] if index % 3 == 0 else [sentence]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    blank = [index for index, line in enumerate(lines) if not line.strip()]

    result = run("dump-teacher", "--teacher", teacher_dir, "--data", corpus, "--out", tmp_path / "cache",
                 "--top-k", 4, "--shard-rows", 7, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path / "cache")
    assert manifest.stats["dropped_rows"] == {"blank text": {"count": len(blank), "sample_ids": blank}}
    assert manifest.dataset["num_rows"] == len(lines) and manifest.total_rows == len(sentences)
    assert f"dropped      {len(blank)} rows: blank text (sample ids {', '.join(map(str, blank[:5]))}, ...)" \
        in result.output
    info = run("info", tmp_path / "cache").output
    assert f"{len(sentences)} of {len(lines)} rows" in info
    assert f"{len(blank)} rows: blank text" in info


def test_info_says_a_limit_cut_the_rows(tmp_path, teacher_dir, corpus):
    assert run("dump-teacher", "--teacher", teacher_dir, "--data", corpus, "--out", tmp_path / "cache",
               "--limit", 5, "--quiet").exit_code == 0
    assert "the rows after the first 5 (--limit)" in run("info", tmp_path / "cache").output


def test_the_manifest_names_teacher_and_data_portably(tmp_path, teacher_dir, corpus):
    """Dumped from relative paths, the manifest names the teacher directory and the data file by their own
    names and identifies the data by size and sha256: the same cache comes from another working directory."""
    work = tmp_path / "work"
    shutil.copytree(teacher_dir, work / "models" / "my-teacher")
    (work / "data").mkdir()
    shutil.copy(corpus, work / "data" / "transfer.jsonl")
    previous = os.getcwd()
    os.chdir(work)
    try:
        result = run("dump-teacher", "--teacher", "./models/my-teacher/", "--data", "data/transfer.jsonl",
                     "--out", tmp_path / "cache", "--top-k", 4, "--limit", 4, "--quiet")
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path / "cache")
    assert manifest.teacher["name_or_path"] == "my-teacher"
    assert manifest.teacher["config_sha256"] and manifest.teacher["weights_sha256"]
    data = corpus.read_bytes()
    assert manifest.dataset["source"] == "transfer.jsonl" and manifest.dataset["location"] == "local"
    assert manifest.dataset["files"] == [{"name": "transfer.jsonl", "bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()}]
    assert "teacher      my-teacher  (llama" in run("info", tmp_path / "cache").output
    assert str(work) not in (tmp_path / "cache" / "kdcache.json").read_text()
