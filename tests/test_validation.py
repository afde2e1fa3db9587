"""Held-out splits, validation during training, early stopping, and the sampled-target guards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from kdcache import DumpSettings, KDCacheError, TrainHooks, TrainSettings, dump_teacher, open_cache, train_student
from kdcache.cache.format import Manifest
from kdcache.cli import main


def test_split_is_deterministic_disjoint_and_independent_of_shard_layout(cache_dir, tmp_path, teacher_dir, corpus):
    split = open_cache(cache_dir).split(0.25)
    assert split == open_cache(cache_dir).split(0.25)
    assert not split.train & split.heldout
    assert split.train | split.heldout == set(range(48)) and len(split.heldout) == 12
    assert split.heldout != set(range(36, 48)), "held out by hashed id, not the last rows of the file"
    relaid = tmp_path / "one-shard"
    dump_teacher(str(teacher_dir), str(corpus), relaid, DumpSettings(top_k=8, batch_size=3, shard_rows=1000),
                 progress=False)
    assert open_cache(relaid).split(0.25) == split
    assert open_cache(cache_dir).split(0.5).heldout >= split.heldout, "a larger fraction extends the held-out set"


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.999])
def test_split_refuses_fractions_that_leave_a_side_empty(cache_dir, fraction):
    with pytest.raises(KDCacheError, match="`val_fraction`"):
        open_cache(cache_dir).split(fraction)


def test_training_never_sees_the_heldout_split(cache_dir, student_config, tmp_path):
    seen = set()
    summary = train_student(cache_dir, tmp_path / "out", student_config=str(student_config), progress=False,
                            settings=TrainSettings(max_steps=12, batch_size=4, val_fraction=0.25, eval_every=4),
                            hooks=TrainHooks(on_batch=lambda epoch, sample_ids: seen.update(sample_ids)))
    heldout = open_cache(cache_dir).split(0.25).heldout
    assert seen == set(range(48)) - heldout, "every training row seen, no held-out row"
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    val_steps = [record["step"] for record in records if "val_kl_to_teacher" in record]
    assert val_steps == [4, 8, 12]
    assert summary["validation"]["heldout_sequences"] == 12


def test_early_stopping_stops_and_keeps_the_best_state(cache_dir, student_config, tmp_path):
    """Scripted held-out KLs: best at the 2nd evaluation, then 2 worse ones stop training (patience 2)."""
    scripted = iter([0.5, 0.3, 0.4, 0.6, 0.1])
    weights_at = {}

    def fake_evaluate(model, cache, *, batch_size, sample_ids):
        weights_at[len(weights_at) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"kl_to_teacher": next(scripted), "top1_agreement": 0.0, "nll": 1.0, "perplexity": math.e}

    out = tmp_path / "out"
    summary = train_student(cache_dir, out, student_config=str(student_config), progress=False,
                            settings=TrainSettings(max_steps=50, batch_size=4, lr=1e-2, val_fraction=0.25,
                                                   eval_every=2, early_stopping=2),
                            hooks=TrainHooks(evaluate=fake_evaluate))
    assert summary["steps"] == 8 and len(weights_at) == 4, "stopped after the 4th evaluation"
    assert summary["validation"] == {"heldout_sequences": 12, "best_step": 4, "best_val_kl_to_teacher": 0.3,
                                     "last": summary["validation"]["last"], "stopped_early": True}
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in weights_at[2].items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(saved[name], value) for name, value in weights_at[4].items())


def test_train_student_on_sampled_targets(tmp_path, teacher_dir, corpus, student_config):
    cache = tmp_path / "cache"
    dump_teacher(str(teacher_dir), str(corpus), cache, DumpSettings(targets="sampled", samples=30, limit=16),
                 progress=False)
    summary = train_student(cache, tmp_path / "out", student_config=str(student_config), progress=False,
                            settings=TrainSettings(max_steps=3, batch_size=4, targets="sampled", loss="forward_kl",
                                                   log_every=1))
    assert summary["steps"] == 3 and math.isfinite(summary["final"]["kd"]) and summary["final"]["kd"] > 0


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_error(result, fragment: str):
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_sampled_targets_on_a_topk_only_cache_is_a_one_line_error(cache_dir, student_config, tmp_path):
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", tmp_path / "s",
                 "--targets", "sampled")
    assert_one_line_error(result, "holds only topk targets")
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--loss", "reverse_kl"], "divergence 'reverse_kl' cannot be estimated from sampled targets"),
    (["--temperature", "2"], "cannot be re-tempered"),
    (["--tail", "renormalize"], "the 'renormalize' tail with sampled targets"),
])
def test_invalid_sampled_loss_combinations_are_one_line_errors(tmp_path, teacher_dir, corpus, student_config, flags,
                                                                fragment):
    cache = tmp_path / "cache"
    dump_teacher(str(teacher_dir), str(corpus), cache, DumpSettings(targets="both", limit=4), progress=False)
    result = run("train-student", "--cache", cache, "--student-config", student_config, "--out", tmp_path / "s",
                 "--targets", "sampled", *flags)
    assert_one_line_error(result, fragment)
    assert "--loss" in result.output and "tail_logprob" not in result.output, "names flags, not internal variables"
    assert not (tmp_path / "s.partial").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--eval-every", 5], "need a validation split"),
    (["--val-fraction", 0.2, "--early-stopping", 2], "--early-stopping needs --eval-every"),
    (["--val-fraction", 1.5], "--val-fraction must be in [0, 1)"),
])
def test_bad_validation_flags_are_one_line_errors(cache_dir, student_config, tmp_path, flags, fragment):
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", tmp_path / "s",
                 *flags)
    assert_one_line_error(result, fragment)


def test_eval_split_fraction_scores_only_the_heldout_rows(cache_dir, student_config, tmp_path):
    student = tmp_path / "student"
    assert run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", student,
               "--max-steps", 2, "--batch-size", 4, "--val-fraction", 0.25).exit_code == 0
    [whole] = json.loads(run("eval", "--cache", cache_dir, "--student", student, "--json").stdout)
    [heldout] = json.loads(run("eval", "--cache", cache_dir, "--student", student, "--json",
                             "--split-fraction", 0.25).stdout)
    manifest = Manifest.load(cache_dir)
    assert whole["positions"] == manifest.total_tokens
    ids = open_cache(cache_dir).split(0.25).heldout
    assert heldout["positions"] == sum(len(s.input_ids) for s in open_cache(cache_dir).sequences() if s.sample_id in ids)
    record = json.loads((student / "kdcache_training.json").read_text())
    assert record["summary"]["validation"]["last"]["val_kl_to_teacher"] == pytest.approx(heldout["kl_to_teacher"],
                                                                                          rel=1e-5)
