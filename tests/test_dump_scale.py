"""Dump at scale: several processes, exactly-once resume after kill -9 or a write error, one dump per cache."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import disk_full_during_second_shard
from kdcache import open_cache
from kdcache.cache.format import Manifest
from kdcache.errors import KDCacheError
from kdcache.teacher import DumpSettings, dump_teacher
from kdcache.teacher.progress import PROGRESS_DIR, DumpLock
from kdcache.teacher.targets import topk_targets

REPO_ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": REPO_ROOT}
FIXTURE_SETTINGS = dict(top_k=8, batch_size=8, shard_rows=16, hidden_layers=(-1,), codec="plain", compression="none")  # `cache_dir`'s


def _rows(cache: Path) -> list:
    manifest = Manifest.load(cache)
    return list(open_cache(cache).sequences(hidden_layers=manifest.hidden_layers))


def _assert_no_dump_state(cache: Path) -> None:
    """A committed cache: it verifies, and nothing of the dump's working state is left."""
    manifest = Manifest.load(cache)
    open_cache(cache).verify(progress=False)
    assert not (cache / PROGRESS_DIR).exists()
    assert sorted(str(path.relative_to(cache)) for path in (cache / "data").iterdir()) == \
        sorted(shard.file for shard in manifest.shards)


def test_topk_targets_match_float64_and_leave_the_logits_untouched():
    torch.manual_seed(0)
    logits = torch.randn(37, 53) * 4
    logits[3, 7] = 40.0  # a row whose tail is far below float32's resolution next to 1
    original = logits.clone()
    next_ids = torch.randint(0, 50, (37,))
    next_ids[-1] = -1
    got = topk_targets(logits, next_ids, vocab_size=50, top_k=5, chunk_size=8)
    reference = torch.log_softmax(logits[:, :50].double(), dim=-1)
    values, ids = reference.topk(5, dim=-1)
    assert torch.equal(logits, original)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.logprobs.double(), values, rtol=0, atol=1e-5)
    tail = torch.logsumexp(reference.scatter(1, ids, float("-inf")), dim=-1)
    torch.testing.assert_close(got.tail_logprob.double(), tail, rtol=1e-5, atol=1e-5)
    assert got.tail_logprob[3] < -20
    expected_next = reference.gather(1, next_ids.clamp(min=0).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got.next_logprob[:-1].double(), expected_next[:-1], rtol=0, atol=1e-5)
    assert torch.isnan(got.next_logprob[-1])
    in_place = topk_targets(logits.clone(), next_ids, vocab_size=50, top_k=5, chunk_size=8, overwrite_logits=True)
    assert all(torch.equal(getattr(in_place, name), getattr(got, name)) for name in ("ids", "logprobs", "tail_logprob"))
    everything = topk_targets(logits, next_ids, vocab_size=50, top_k=50)
    assert torch.isneginf(everything.tail_logprob).all()


def test_a_write_error_leaves_no_half_shard_and_the_rerun_resumes(tmp_path, teacher_dir, corpus, cache_dir):
    """Disk full while the second shard is written: a clear error; the rerun keeps shard one."""
    out = tmp_path / "cache"
    with pytest.raises(KDCacheError, match="No space left on device.*rerun the same command to resume"):
        dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(**FIXTURE_SETTINGS), progress=False,
                     hooks=disk_full_during_second_shard(Manifest.load(cache_dir)))
    assert not (out / "kdcache.json").exists()
    assert [path.name for path in (out / "data").iterdir()] == ["shard-00000-00000.arrow"], "no half shard"

    with pytest.raises(KDCacheError, match=r"interrupted dump with different settings \(top_k 8 → 5\)"):
        dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(**{**FIXTURE_SETTINGS, "top_k": 5}),
                     progress=False)
    with pytest.raises(KDCacheError, match=r"different settings \(batch_size 8 → 4\)"):
        dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(**{**FIXTURE_SETTINGS, "batch_size": 4}),
                     progress=False)

    manifest = dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(**FIXTURE_SETTINGS), progress=False)
    assert manifest.stats["resumed_shards"] == 1
    # batches depend only on the shard, so the resumed cache is byte-identical to an uninterrupted one
    assert manifest.shards == Manifest.load(cache_dir).shards
    _assert_no_dump_state(out)


def test_a_second_dump_into_the_same_cache_is_refused(tmp_path, teacher_dir, corpus):
    out = tmp_path / "cache"
    out.mkdir()
    lock = DumpLock(out)
    try:
        with pytest.raises(KDCacheError, match="another kdcache dump is writing to"):
            dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(top_k=4, limit=4), progress=False)
    finally:
        lock.release()
    assert not (out / "data").exists()
    assert dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(top_k=4, limit=4),
                        progress=False).total_rows == 4


def test_rows_with_nonfinite_targets_are_never_written(tmp_path, teacher_dir, corpus, tokenizer):
    """NaN logits: the dump fails naming the count; --skip-nonfinite commits without those rows, no recompute."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    poisoned_word = texts[0].split()[1]
    poisoned_id = tokenizer.convert_tokens_to_ids(poisoned_word)
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned_id] = float("nan")
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    expected_bad = [i for i, text in enumerate(texts) if poisoned_id in tokenizer(text)["input_ids"]]
    assert 0 < len(expected_bad) < len(texts)

    out, settings = tmp_path / "cache", DumpSettings(top_k=4, shard_rows=16)
    with pytest.raises(KDCacheError, match=f"NaN/inf logits at .* positions in {len(expected_bad)} sequences"):
        dump_teacher(str(tmp_path / "teacher"), str(corpus), out, settings, progress=False)
    assert not (out / "kdcache.json").exists()
    manifest = dump_teacher(str(tmp_path / "teacher"), str(corpus), out,
                            DumpSettings(top_k=4, shard_rows=16, skip_nonfinite=True), progress=False)
    assert manifest.stats["resumed_shards"] == 3, "committing needed no new forward pass"
    assert manifest.stats["skipped_sample_ids"] == expected_bad and manifest.stats["nonfinite_positions"] > 0
    written = [row.sample_id for row in _rows(out)]
    assert written == sorted(set(range(len(texts))) - set(expected_bad))
    assert all(np.isfinite(row.topk_logprobs.astype(np.float32)).all() for row in _rows(out))


def test_device_map_reaches_transformers(tmp_path, teacher_dir, corpus, cache_dir):
    """`--device-map` goes to `from_pretrained` (big-model loading): transformers' own check rejects a
    value it does not know; `auto` places the teacher, and placement is not content."""
    with pytest.raises(KDCacheError, match="cannot load teacher from .*device_map.*found nowhere"):
        dump_teacher(str(teacher_dir), str(corpus), tmp_path / "refused",
                     DumpSettings(**FIXTURE_SETTINGS, device_map="nowhere"), progress=False)
    manifest = dump_teacher(str(teacher_dir), str(corpus), tmp_path / "cache",
                            DumpSettings(**FIXTURE_SETTINGS, device_map="auto"), progress=False)
    assert manifest.settings["device_map"] == "auto"
    assert manifest.dump_fingerprint == Manifest.load(cache_dir).dump_fingerprint
    assert manifest.shards == Manifest.load(cache_dir).shards


def test_a_launch_accelerate_does_not_see_is_refused(tmp_path, teacher_dir, corpus, monkeypatch):
    """e.g. torchrun on CPU without ACCELERATE_USE_CPU: each process would dump everything alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KDCacheError, match="launched as 2 processes but Accelerate runs 1"):
        dump_teacher(str(teacher_dir), str(corpus), tmp_path / "cache", DumpSettings(top_k=4), progress=False)
    assert not (tmp_path / "cache").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(tmp_path, teacher_dir, corpus, cache_dir):
    out = tmp_path / "cache"
    # `accelerate launch --cpu` starts one process unless mpirun is configured; torchrun + ACCELERATE_USE_CPU
    # is Accelerate's multi-CPU (gloo) path
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "kdcache", "dump-teacher",
               "--teacher", str(teacher_dir), "--data", str(corpus), "--out", str(out), "--top-k", "8", "--codec", "plain", "--compression", "none",
               "--batch-size", "8", "--shard-rows", "16", "--hidden-layers", "-1"]
    result = subprocess.run(command, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, "only the main process reports"
    manifest, single = Manifest.load(out), Manifest.load(cache_dir)
    assert manifest.stats["num_processes"] == 2
    assert [shard.file for shard in manifest.shards] == [
        "data/shard-00000-00000.arrow", "data/shard-00001-00001.arrow", "data/shard-00000-00002.arrow"]
    assert manifest.dump_fingerprint == single.dump_fingerprint
    assert manifest.stats["content_sha256"] == single.stats["content_sha256"]
    assert [(s.rows, s.tokens) for s in manifest.shards] == [(s.rows, s.tokens) for s in single.shards]
    _assert_no_dump_state(out)
    for mine, reference in zip(_rows(out), _rows(cache_dir), strict=True):
        assert mine.sample_id == reference.sample_id
        assert np.array_equal(mine.input_ids, reference.input_ids)
        # processes may run with other thread counts: equal up to float reduction order
        assert (mine.topk_ids == reference.topk_ids).mean() > 0.99
        np.testing.assert_allclose(mine.topk_logprobs.astype(np.float32), reference.topk_logprobs.astype(np.float32),
                                   atol=2e-3)
        np.testing.assert_allclose(mine.tail_logprob, reference.tail_logprob, atol=1e-4)
        np.testing.assert_allclose(mine.hidden[2].astype(np.float32), reference.hidden[2].astype(np.float32),
                                   atol=2e-2)


SLOW_DUMP = """
import os, sys, time
from kdcache.cache import writer
finish_shard = writer.ShardWriter._finish_shard
def finish_then_linger(self):  # the shard file is in place, its record not yet written
    finish_shard(self)
    time.sleep(0.6)
writer.ShardWriter._finish_shard = finish_then_linger
from kdcache.teacher import DumpSettings, dump_teacher
while not os.path.exists(sys.argv[4]):  # imports done ahead of time; start when told
    time.sleep(0.01)
dump_teacher(sys.argv[1], sys.argv[2], sys.argv[3], DumpSettings(top_k=8, batch_size=4, shard_rows=4), progress=False)
"""


def _start_slow_dump(tmp_path, teacher_dir, corpus, out, go: Path) -> subprocess.Popen:
    """A dump subprocess that lingers after each shard file and waits for `go` to exist before starting."""
    script = tmp_path / "slow_dump.py"
    script.write_text(SLOW_DUMP)
    return subprocess.Popen([sys.executable, str(script), str(teacher_dir), str(corpus), str(out), str(go)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the dump made no progress"
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_every_row_once(tmp_path, teacher_dir, corpus):
    settings = DumpSettings(top_k=8, batch_size=4, shard_rows=4)
    reference = tmp_path / "reference"
    dump_teacher(str(teacher_dir), str(corpus), reference, settings, progress=False)
    out = tmp_path / "cache"
    records = out / PROGRESS_DIR / "shards"

    def shard_files():
        return sorted((out / "data").glob("*.arrow")) if (out / "data").exists() else []

    def record_count():
        return len(list(records.glob("*.json"))) if records.exists() else 0

    # both kill -9 victims import in parallel; each starts dumping when its go-file appears
    first = _start_slow_dump(tmp_path, teacher_dir, corpus, out, tmp_path / "go1")
    second = _start_slow_dump(tmp_path, teacher_dir, corpus, out, tmp_path / "go2")
    (tmp_path / "go1").touch()

    # run 1: killed after the first shard is committed, while a second dump is turned away
    _wait_for(lambda: record_count() >= 1, first)
    with pytest.raises(KDCacheError, match="another kdcache dump is writing"):
        dump_teacher(str(teacher_dir), str(corpus), out, settings, progress=False)
    first.send_signal(signal.SIGKILL)
    first.wait()

    # run 2: killed while one of its shards is in place but that shard's record is not yet written
    left_by_first = set(shard_files())
    (tmp_path / "go2").touch()

    def new_shard_without_record():
        return any(path not in left_by_first and not (records / f"{path.stem[-5:]}.json").exists()
                   for path in shard_files())

    _wait_for(new_shard_without_record, second)
    second.send_signal(signal.SIGKILL)
    second.wait()

    # run 3 finishes the job
    manifest = dump_teacher(str(teacher_dir), str(corpus), out, settings, progress=False)
    assert manifest.stats["resumed_shards"] >= 2
    _assert_no_dump_state(out)
    resumed, uninterrupted = _rows(out), _rows(reference)
    assert [row.sample_id for row in resumed] == list(range(48)), "every sample id exactly once"
    for mine, expected in zip(resumed, uninterrupted, strict=True):
        for column in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            assert np.array_equal(getattr(mine, column), getattr(expected, column)), column
    assert manifest.shards == Manifest.load(reference).shards


def test_a_resumed_sampled_dump_equals_an_uninterrupted_one(tmp_path, teacher_dir, corpus):
    """`--targets both`: draws and fidelity card survive a write error and resume; sampling settings are identity."""
    settings = DumpSettings(**{**FIXTURE_SETTINGS, "hidden_layers": ()}, targets="both", samples=20, seed=3,
                            fidelity_every=1)
    reference = tmp_path / "reference"
    dump_teacher(str(teacher_dir), str(corpus), reference, settings, progress=False)

    out = tmp_path / "cache"
    with pytest.raises(KDCacheError, match="No space left on device"):
        dump_teacher(str(teacher_dir), str(corpus), out, settings, progress=False,
                     hooks=disk_full_during_second_shard(Manifest.load(reference)))
    for changed, message in (({"samples": 10}, "samples 20 → 10"), ({"seed": 4}, "seed 3 → 4"),
                             ({"targets": "sampled"}, "targets both → sampled")):
        with pytest.raises(KDCacheError, match=f"different settings \\({message}\\)"):
            dump_teacher(str(teacher_dir), str(corpus), out, dataclasses.replace(settings, **changed), progress=False)

    manifest = dump_teacher(str(teacher_dir), str(corpus), out, settings, progress=False)
    expected = Manifest.load(reference)
    assert manifest.stats["resumed_shards"] == 1
    assert manifest.shards == expected.shards, "byte-identical shards, sampled columns included"
    card = manifest.stats["fidelity"]
    assert card == expected.stats["fidelity"]
    assert card["positions"] == manifest.total_tokens, "each position counted once across the two runs"
    assert 0 < card["sampled"]["captured_mass"] < 1 and 0 < card["topk"]["captured_mass"] < 1
    rows = _rows(out)
    assert all(len(row.sampled_ids) == len(row.input_ids) for row in rows)
    assert all((row.sampled_counts.values.reshape(-1) > 0).all() for row in rows)
    _assert_no_dump_state(out)
