"""train-student: learns the teacher from the cache alone; refuses incompatible students and caches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import LANGUAGE, tiny_llama_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.cache.format import Manifest
from kdcache.errors import KDCacheError
from kdcache.student import TrainHooks, TrainSettings, evaluate, train_student
from kdcache.teacher import DumpSettings, dump_teacher


def test_trained_student_saves_and_loads(cache_dir, student_config, tmp_path):
    out = tmp_path / "student"
    summary = train_student(cache_dir, out, student_config=str(student_config), progress=False,
                            settings=TrainSettings(max_steps=3, batch_size=4, ce_weight=0.5, hidden_weight=1.0))
    assert summary["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == Manifest.load(cache_dir).vocab_size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "kd", "hidden", "loss", "tokens_per_second"} <= set(records[-1])
    assert (out / "kdcache_projections.pt").is_file(), "hidden 16 -> 32 needs a learned projection"
    assert not (tmp_path / "student.partial").exists()
    assert model(torch.tensor([[2, 5, 6]])).logits.shape[-1] == 64


def test_an_on_step_hook_sees_every_step_and_can_stop_the_run(cache_dir, student_config, tmp_path):
    """`on_step` gets each optimizer step with the positions trained so far; True ends the run cleanly."""
    seen, batches = [], []
    hooks = TrainHooks(on_step=lambda step, tokens: seen.append((step, tokens)) or step == 3,
                       on_batch=lambda epoch, sample_ids: batches.append(sample_ids))
    summary = train_student(cache_dir, tmp_path / "student", student_config=str(student_config), progress=False,
                            settings=TrainSettings(max_steps=10, batch_size=4, grad_accum=2), hooks=hooks)
    assert [step for step, _ in seen] == [1, 2, 3] and summary["steps"] == 3
    assert len(batches) == 6 and all(len(ids) == 4 for ids in batches), "two micro-batches per step"
    assert seen[-1][1] == summary["tokens"] and seen[0][1] < seen[1][1] < seen[2][1]
    assert (tmp_path / "student" / "config.json").is_file(), "a stopped run is saved like a finished one"


def test_loss_is_exactly_the_weighted_sum(cache_dir, student_config, tmp_path):
    """No hidden extra terms: loss == ce_weight·CE + kd_weight·KD with the logged components."""
    out = tmp_path / "student"
    train_student(cache_dir, out, student_config=str(student_config), progress=False,
                  settings=TrainSettings(max_steps=2, batch_size=4, ce_weight=0.3, kd_weight=0.7, log_every=1))
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert record["loss"] == pytest.approx(0.3 * record["ce"] + 0.7 * record["kd"], rel=1e-6)
        assert "hidden" not in record


@pytest.mark.slow
def test_kd_student_gets_closer_to_the_teacher_than_ce_only(tmp_path, tokenizer):
    """The product's promise: with the same student, steps and text, KD lowers held-out KL to the teacher."""
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=64, layers=2))
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    train = write_jsonl(tmp_path / "train.jsonl", LANGUAGE.sentences(64, seed=11))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", LANGUAGE.sentences(32, seed=12))
    settings = DumpSettings(top_k=16, batch_size=16)
    dump_teacher(str(teacher_dir), str(train), tmp_path / "cache", settings, progress=False)
    dump_teacher(str(teacher_dir), str(heldout), tmp_path / "heldout", settings, progress=False)
    config = tmp_path / "student.json"
    config.write_text(tiny_llama_config(len(tokenizer), hidden=32, layers=1).to_json_string())
    scores = {}
    for name, weights in {"kd": {"kd_weight": 1.0, "ce_weight": 0.0}, "ce": {"kd_weight": 0.0, "ce_weight": 1.0}}.items():
        train_student(tmp_path / "cache", tmp_path / name, student_config=str(config), progress=False,
                      settings=TrainSettings(max_steps=60, batch_size=8, lr=3e-3, **weights))
        scores[name] = evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / name), tmp_path / "heldout")
    assert scores["kd"]["kl_to_teacher"] < 0.7 * scores["ce"]["kl_to_teacher"]
    assert scores["kd"]["top1_agreement"] > scores["ce"]["top1_agreement"]


def test_student_with_smaller_vocabulary_is_refused(cache_dir, tmp_path, tokenizer):
    config = tmp_path / "small.json"
    config.write_text(tiny_llama_config(len(tokenizer) - 10, hidden=16, layers=1).to_json_string())
    with pytest.raises(KDCacheError, match="student vocabulary .* smaller than the cache's tokenizer"):
        train_student(cache_dir, tmp_path / "out", student_config=str(config), progress=False)
    assert not (tmp_path / "out").exists()


def test_student_with_another_tokenizer_is_refused(cache_dir, tmp_path):
    from kdcache.demo.synthetic import build_word_tokenizer
    other = build_word_tokenizer([f"x{i}" for i in range(60)])
    student_dir = tmp_path / "pretrained"
    AutoModelForCausalLM.from_config(tiny_llama_config(len(other), hidden=16, layers=1)).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    with pytest.raises(KDCacheError, match="student tokenizer .* differs from the cache's tokenizer"):
        train_student(cache_dir, tmp_path / "out", student=str(student_dir), progress=False)


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_damaged_cache_is_refused_before_training(cache_dir, student_config, tmp_path, damage):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    shard = copy / Manifest.load(copy).shards[1].file
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    expected = "is missing" if damage == "delete" else "fails its sha256 check"
    with pytest.raises(KDCacheError, match=expected):
        train_student(copy, tmp_path / "out", student_config=str(student_config), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("threads", [1, None])
def test_library_calls_apply_the_thread_policy_and_restore_the_callers(cache_dir, student_config, tmp_path, threads):
    """`TrainSettings.threads` (default: the CLI's policy, kdcache/runtime.py) holds during the call; the caller's
    thread count comes back after it (a notebook's later work computes as before)."""
    from kdcache.runtime import default_threads
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = []
        train_student(cache_dir, tmp_path / f"s{threads}", student_config=str(student_config),
                      settings=TrainSettings(max_steps=1, batch_size=4, threads=threads), progress=False,
                      hooks=TrainHooks(on_batch=lambda epoch, ids: seen.append(torch.get_num_threads())))
        assert set(seen) == {threads if threads is not None else default_threads()[0]}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(KDCacheError, match="`threads` must be positive"):
        TrainSettings(threads=0)
