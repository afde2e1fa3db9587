"""A received cache, checkpoint or server is hostile: nothing runs, nothing outside is touched, nothing
wrong trains silently, and every refusal is one line (issue 10's attacks, one test each)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from hostile import (
    Trickle,
    Truncate,
    copy_cache,
    drop_last_of_first_row,
    edit_manifest,
    map_values,
    rehash,
    rewrite_shard,
    serve,
)
from test_streaming import RangeRequestHandler

from kdcache.cache.format import Manifest
from kdcache.cli import main
from kdcache.errors import KDCacheError
from kdcache.student import TrainSettings, train_student

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(max_steps=2, batch_size=4)


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line.replace("`", "") for line in result.output.splitlines() if "Error:" in line]
    assert "Traceback" not in result.output, result.output
    assert len(errors) == 1 and fragment.replace("`", "") in errors[0], result.output  # the CLI drops backticks
    return errors[0]


def train(cache, out, student_config, **settings):
    return train_student(cache, out, student_config=str(student_config), progress=False,
                         settings=TrainSettings(**{**QUICK, **settings}))


@pytest.fixture()
def hostile(tmp_path, cache_dir):
    return copy_cache(cache_dir, tmp_path / "hostile")


# 1. Paths from a manifest stay inside the cache ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.arrow", "data/../../outside.arrow", "data/.hidden.arrow",
                                  "data\\..\\x.arrow", "", "data//x.arrow"])
def test_shard_paths_outside_the_cache_are_refused_before_any_read(hostile, name):
    (hostile.parent / "outside.arrow").write_bytes(b"secret")
    edit_manifest(hostile, lambda data: data["shards"][0].update(file=name))
    one_line_error(run("verify", hostile), "not a plain relative path")
    one_line_error(run("info", hostile), "not a plain relative path")


@pytest.mark.parametrize("what", ["shard", "data-dir"])
def test_symlinks_out_of_the_cache_are_refused(hostile, tmp_path, what):
    shard = hostile / Manifest.load(hostile).shards[0].file
    if what == "shard":
        outside = tmp_path / "elsewhere.arrow"
        shard.rename(outside)
        shard.symlink_to(outside)
    else:
        (hostile / "data").rename(tmp_path / "elsewhere")
        (hostile / "data").symlink_to(tmp_path / "elsewhere")
    one_line_error(run("verify", hostile), "goes through a symlink")


@pytest.mark.parametrize("name", ["../../escaped.arrow", "/tmp/kdcache-escaped.arrow"])
def test_read_through_never_writes_outside_its_directory(hostile, tmp_path, student_config, name):
    """The attack that became code execution: a remote manifest naming `../../x.pth` (or an absolute path)
    with `--read-through`; the forger also supplies the matching hash."""
    evil = Path(name) if name.startswith("/") else (tmp_path / "downloads" / "x" / name).resolve()
    edit_manifest(hostile, lambda data: data["shards"][0].update(file=name))
    with serve(hostile, RangeRequestHandler) as url:
        with pytest.raises(KDCacheError, match="not a plain relative path"):
            train(url, tmp_path / "out", student_config, read_through=str(tmp_path / "downloads"))
    assert not evil.exists() and not list(tmp_path.rglob("escaped*"))


def test_read_through_copy_is_checked_before_it_is_renamed_into_place(hostile, tmp_path, student_config):
    shard = hostile / Manifest.load(hostile).shards[1].file
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    downloads = tmp_path / "downloads"
    with serve(hostile, RangeRequestHandler) as url:
        with pytest.raises(KDCacheError, match="fails its sha256 check"):
            train(url, tmp_path / "out", student_config, read_through=str(downloads), verify=False)
    sha = Manifest.load(hostile).shards[1].sha256
    assert not (downloads / f"{sha}.arrow").exists() and not list(downloads.glob("*partial*"))


# 2. Nothing in a checkpoint or tokenizer is unpickled or run ------------------------------------------------------

class Payload:
    """Unpickling this creates `marker`: stands in for `os.system(...)`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def checkpointed(cache_dir, student_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpointed") / "student"
    train(cache_dir, out, student_config, max_steps=3, save_every=2)
    return out


def test_checkpoints_hold_no_kdcache_pickles(checkpointed):
    checkpoint = checkpointed / "checkpoints" / "step-00000002"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"kdcache_state.json", "kdcache_state.safetensors", "model.safetensors"} <= names
    assert not any(name.startswith("custom_checkpoint") for name in names)
    assert json.loads((checkpoint / "kdcache_state.json").read_text())["progress"]["step"] == 2


@pytest.mark.parametrize("file, fragment", [("custom_checkpoint_0.pkl", "holds pickled objects (custom_checkpoint_0"),
                                            ("optimizer.bin", "would need weights_only=False")])
def test_a_checkpoint_that_would_run_code_is_refused(checkpointed, tmp_path, cache_dir, student_config, file, fragment):
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    shutil.copytree(checkpointed / "checkpoints" / "step-00000002", checkpoint)
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), checkpoint / file)
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", tmp_path / "out",
                 "--max-steps", 3, "--batch-size", 4, "--save-every", 2, "--resume-from", checkpoint)
    one_line_error(result, fragment)
    assert not marker.exists()


@pytest.mark.parametrize("file", ["kdcache_state.json", "kdcache_state.safetensors", "model.safetensors",
                                  "optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_an_emptied_checkpoint_file_is_one_line(checkpointed, tmp_path, cache_dir, student_config, file):
    """A checkpoint cut short (a full disk, a partial copy): resuming names the checkpoint, no traceback."""
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    shutil.copytree(checkpointed / "checkpoints" / "step-00000002", checkpoint)
    (checkpoint / file).write_bytes(b"")
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", tmp_path / "out",
                 "--max-steps", 3, "--batch-size", 4, "--save-every", 2, "--resume-from", checkpoint)
    one_line_error(result, f"checkpoint {checkpoint}")
    assert not (tmp_path / "out").exists()


def test_tokenizer_asking_for_remote_code_is_refused_without_running_it(hostile, tmp_path, student_config):
    marker = tmp_path / "pwned"
    (hostile / "tokenizer" / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    config = json.loads((hostile / "tokenizer" / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (hostile / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    rehash(hostile)
    with pytest.raises(KDCacheError, match="asks to run its own code"):
        train(hostile, tmp_path / "out", student_config)
    assert not marker.exists()


def swap_two_ids(cache: Path) -> None:
    path = cache / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(tokenizer))


def test_tokenizer_files_are_fingerprinted(hostile):
    swap_two_ids(hostile)
    one_line_error(run("verify", hostile), "tokenizer.json differs from its sha256")


def test_a_forged_tokenizer_fingerprint_still_fails_on_the_vocabulary(hostile, tmp_path, student_config):
    swap_two_ids(hostile)
    rehash(hostile)
    with pytest.raises(KDCacheError, match="tokenizer does not match its manifest: hash"):
        train(hostile, tmp_path / "out", student_config)


def test_a_relative_cache_without_tokenizer_is_not_looked_up_on_the_hub(hostile, student_config, monkeypatch):
    shutil.rmtree(hostile / "tokenizer")
    rehash(hostile)
    monkeypatch.chdir(hostile.parent)
    with pytest.raises(KDCacheError, match="no tokenizer directory"):
        train("hostile", "out", student_config, verify=False)


# 3.-4. The bytes that train are the bytes that were verified; transfers end -------------------------------------

class Liar(RangeRequestHandler):
    """Serves each shard's real bytes to the first GET for it, then a same-size copy from `liar_dir`."""

    liar_dir: Path
    requests: Counter

    def do_GET(self):
        self.requests[self.path] += 1
        return super().do_GET()

    def translate_path(self, path):
        real = super().translate_path(path)
        if path.endswith(".arrow") and self.requests[path] > 1:
            return str(self.liar_dir / Path(real).relative_to(self.directory))
        return real


@pytest.mark.parametrize("forgery", ["nan", "plausible"])
def test_a_server_that_changes_shards_after_verify_is_caught(cache_dir, tmp_path, student_config, forgery):
    """`plausible` keeps every value valid (log-probs halved), so only the per-batch hashes can catch it."""
    change = (lambda values: np.full_like(values, np.nan)) if forgery == "nan" else (lambda values: values / 2)
    liar_dir = tmp_path / "liar"
    for index, shard in enumerate(Manifest.load(cache_dir).shards):
        (liar_dir / "data").mkdir(parents=True, exist_ok=True)
        rewrite_shard(cache_dir, index, "topk_logprobs", lambda column: map_values(column, change),
                      target=liar_dir / shard.file)
        assert (liar_dir / shard.file).stat().st_size == shard.bytes
    handler = type("LiarHere", (Liar,), {"liar_dir": liar_dir, "requests": Counter()})
    with serve(cache_dir, handler) as url:
        with pytest.raises(KDCacheError, match="does not match its hash in the manifest"):
            train(url, tmp_path / "out", student_config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("handler, fragment", [(Trickle, "gave up"), (Truncate, "broke off after")])
def test_trickling_or_truncating_servers_end_in_one_line(cache_dir, tmp_path, student_config, handler, fragment):
    downloads = tmp_path / "downloads"
    started = time.monotonic()
    with serve(cache_dir, handler) as url:
        result = run("train-student", "--cache", url, "--student-config", student_config, "--out", tmp_path / "out",
                     "--max-steps", 2, "--read-through", downloads, "--transfer-timeout", 1.5)
    one_line_error(result, fragment)
    assert time.monotonic() - started < 15
    assert not list(downloads.glob("*.arrow")), "an incomplete download was renamed into place"


# 5. Validation on read --------------------------------------------------------------------------------------------

def nan_at_first(values):
    values[0] = np.nan
    return values


def set_first(value):
    def change(values):
        values[0] = value
        return values
    return change


VALUE_ATTACKS = {
    "nan-logprob": ("topk_logprobs", lambda column: map_values(column, nan_at_first), "`topk_logprobs` holds nan"),
    "positive-logprob": ("topk_logprobs", lambda column: map_values(column, set_first(5.0)), "not a log-probability"),
    "id-beyond-vocabulary": ("topk_ids", lambda column: map_values(column, set_first(60000)), "`topk_ids` holds 60000"),
    "negative-token": ("input_ids", lambda column: map_values(column, set_first(-1)), "`input_ids` holds -1"),
    "short-targets": ("tail_logprob", drop_last_of_first_row, "`tail_logprob` lists do not have one entry per"),
    "nan-hidden": ("hidden_2", lambda column: map_values(column, nan_at_first), "`hidden_2` holds nan"),
}


@pytest.mark.parametrize("attack", sorted(VALUE_ATTACKS))
def test_values_out_of_range_fail_verify(hostile, attack):
    column, change, fragment = VALUE_ATTACKS[attack]
    rewrite_shard(hostile, 1, column, change)
    rehash(hostile)
    one_line_error(run("verify", hostile), fragment)


@pytest.mark.parametrize("attack", ["nan-logprob", "id-beyond-vocabulary", "short-targets"])
def test_values_out_of_range_stop_training_without_verify(hostile, tmp_path, student_config, attack):
    column, change, fragment = VALUE_ATTACKS[attack]
    rewrite_shard(hostile, 0, column, change)
    rehash(hostile)
    result = run("train-student", "--cache", hostile, "--student-config", student_config, "--out", tmp_path / "out",
                 "--max-steps", 20, "--batch-size", 4, "--no-verify")
    one_line_error(result, fragment)


def test_duplicate_sample_ids_and_shard_entries_are_refused(hostile, tmp_path):
    rewrite_shard(hostile, 1, "sample_id", lambda column: map_values(column, lambda ids: ids - 16))
    rehash(hostile)
    one_line_error(run("verify", hostile), "appears 2 times")
    edit_manifest(hostile, lambda data: data["shards"].append(data["shards"][0]))
    one_line_error(run("verify", hostile), "is not a distinct .arrow file")


def zeros_in_first_row(count: int):
    """A list column whose first row is `count` zeros (a decompression bomb once zstd-compressed)."""
    def change(column: pa.Array) -> pa.Array:
        offsets = column.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        lengths[0] = count
        return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                        pa.array(np.zeros(int(lengths.sum()), dtype=np.int32)))
    return change


def test_a_small_shard_claiming_huge_sizes_is_refused_before_allocation(hostile, tmp_path):
    """A few KB of zstd that would decode to 80 MB of tokens: refused from the manifest's claims, or, when the
    manifest's counts are plausible, from the record batch header, before any decompression. A shard that
    zstd merely compresses (the compact codec's default) reads as usual."""
    rewrite_shard(hostile, 0, "input_ids", lambda column: map_values(column, lambda ids: ids), compression="zstd")
    rehash(hostile)
    assert run("verify", hostile).exit_code == 0
    rewrite_shard(hostile, 0, "input_ids", zeros_in_first_row(20_000_000), compression="zstd")
    rehash(hostile)
    assert (hostile / Manifest.load(hostile).shards[0].file).stat().st_size < 200_000
    one_line_error(run("verify", hostile), "record batch 0 would decode to")
    edit_manifest(hostile, lambda data: data["shards"][0].update(tokens=250_000_000))
    one_line_error(run("verify", hostile), "more than its")


# 6. kdcache removes only what it created; saves are atomic -------------------------------------------------------

def test_a_foreign_partial_directory_is_refused_not_deleted(cache_dir, tmp_path, student_config):
    foreign = tmp_path / "results.partial"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out",
                 tmp_path / "results", "--max-steps", 1)
    one_line_error(result, "results.partial exists but kdcache did not create it")
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_a_failed_final_save_keeps_the_checkpoint_and_resumes(checkpointed, cache_dir, tmp_path, student_config):
    """Writes capped at 8 KB (RLIMIT_FSIZE: the kernel's 'file too large', like a full disk) while the
    resumed run saves its 19 KB model: one line, no half-written model, and the checkpoint resumes later."""
    out = tmp_path / "student"
    staging = tmp_path / "student.partial"
    shutil.copytree(checkpointed / "checkpoints", staging / "checkpoints")
    (staging / ".kdcache-run").touch()

    def cap_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    command = [sys.executable, "-m", "kdcache", "train-student", "--cache", str(cache_dir), "--student-config",
               str(student_config), "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--save-every", "2",
               "--resume"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=cap_writes,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "cannot save the student" in result.stderr and "step-00000002 is kept" in result.stderr
    assert not out.exists() and not (staging / "model.safetensors").exists()
    train_student(cache_dir, out, student_config=str(student_config), progress=False, resume=True,
                  settings=TrainSettings(max_steps=3, batch_size=4, save_every=2))
    assert_same_weights_of_models(checkpointed, out)


def assert_same_weights_of_models(first: Path, second: Path) -> None:
    from transformers import AutoModelForCausalLM
    a, b = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (first, second))
    assert all(torch.equal(a[name], b[name]) for name in a)


# 7. One line each, never a traceback ----------------------------------------------------------------------------

MANIFEST_EDITS = {
    "format-version-string": (lambda data: data.update(format_version="1"), "`format_version` must be an integer"),
    "format-version-negative": (lambda data: data.update(format_version=-1), "`format_version` must be between"),
    "json-list": (lambda data: [data], "`manifest` must be a JSON object"),
    "no-top-k": (lambda data: data["settings"].pop("top_k") and None, "`settings.top_k` must be an integer"),
    "no-logprob-dtype": (lambda data: data["settings"].pop("logprob_dtype") and None, "`settings.logprob_dtype`"),
    "float64": (lambda data: data["settings"].update(logprob_dtype="float64"), "must be one of uint8, float16, float32"),
    "negative-top-k": (lambda data: data["settings"].update(top_k=-3), "`settings.top_k` must be between"),
    "file-null": (lambda data: data["shards"][0].update(file=None), "is not a path"),
    "vocab-string": (lambda data: data["tokenizer"].update(vocab_size="64"), "`tokenizer.vocab_size` must be an"),
    "no-tokenizer-hash": (lambda data: data["tokenizer"].pop("hash") and None, "`tokenizer.hash` is not a valid value"),
    "vocab-10": (lambda data: data["tokenizer"].update(vocab_size=10), "outside [0, 10)"),
    # a multi-teacher manifest (docs/format.md, "Several teachers") forged on a single-teacher cache
    "one-teacher": (lambda data: data.update(teachers=[{"name": "a", "path": ""}]), "`teachers` must be a list of 2"),
    "teacher-escapes": (lambda data: data.update(teachers=[{"name": "a", "path": ""}, {
        "name": "b", "path": "../../b", "manifest_sha256": "0" * 64}]), "`teachers[1].path` must be teachers/b"),
    "teacher-name": (lambda data: data.update(teachers=[{"name": "a", "path": ""}, {
        "name": "../b", "path": "teachers/../b", "manifest_sha256": "0" * 64}]), "`teachers[1].name` is not a valid"),
    "teacher-missing": (lambda data: data.update(teachers=[{"name": "a", "path": ""}, {
        "name": "b", "path": "teachers/b", "manifest_sha256": "0" * 64}]), "teachers/b/kdcache.json is missing"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_malformed_manifests_are_one_line_errors(hostile, case):
    edit, fragment = MANIFEST_EDITS[case]
    edit_manifest(hostile, edit)
    one_line_error(run("verify", hostile), fragment)


def test_non_utf8_data_is_refused_before_the_output_is_claimed(tmp_path, teacher_dir):
    data = tmp_path / "corpus.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9 \xff"}\n')
    result = run("dump-teacher", "--teacher", teacher_dir, "--data", data, "--out", tmp_path / "cache")
    one_line_error(result, "Invalid UTF8")
    assert not (tmp_path / "cache").exists()


def test_out_that_is_a_file_is_a_one_line_error(cache_dir, tmp_path, student_config):
    (tmp_path / "out").write_text("not a directory")
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", tmp_path / "out")
    one_line_error(result, "is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_a_one_line_error(cache_dir, tmp_path, student_config):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", parent / "out")
    one_line_error(result, "cannot create")


def test_unreadable_student_weights_in_eval(cache_dir, checkpointed, tmp_path):
    student = shutil.copytree(checkpointed, tmp_path / "student", ignore=shutil.ignore_patterns("checkpoints"))
    (student / "model.safetensors").write_bytes(b"\x00" * 100)
    one_line_error(run("eval", "--cache", cache_dir, "--student", student), "cannot load student")


def test_info_and_verify_take_urls_and_info_escapes_control_characters(hostile):
    edit_manifest(hostile, lambda data: data["teacher"].update(name_or_path="\x1b]0;owned\x07\x1b[31mteacher"))
    with serve(hostile, RangeRequestHandler) as url:
        info = run("info", url)
        assert info.exit_code == 0, info.output
        assert "\x1b" not in info.output and "\x07" not in info.output and "\\x1b[31mteacher" in info.output
        assert run("verify", url).output.strip().endswith("48 sequences, " +
                                                          f"{Manifest.load(hostile).total_tokens} tokens")
