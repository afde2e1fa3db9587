"""Exact resume: a run killed after a checkpoint and resumed ends bitwise equal to an uninterrupted run (CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache import KDCacheError, TrainHooks, TrainSettings, train_student

SETTINGS = dict(max_steps=7, batch_size=4, grad_accum=2, ce_weight=0.5, hidden_weight=1.0, log_every=3, seed=3,
                shuffle_buffer=8, save_every=2, keep_checkpoints=2, prefetch=2)


def assert_same_weights(first, second):
    """Bitwise: the student's weights and the learned hidden-state projection."""
    for load in (lambda path: AutoModelForCausalLM.from_pretrained(path).state_dict(),
                 lambda path: torch.load(path / "kdcache_projections.pt")):
        a, b = load(first), load(second)
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, student_config, tmp_path_factory):
    whole = tmp_path_factory.mktemp("uninterrupted") / "whole"
    train_student(cache_dir, whole, student_config=str(student_config), progress=False,
                  settings=TrainSettings(**SETTINGS))
    return whole


class Killed(Exception):
    """Stands in for SIGKILL: raised right after a checkpoint, it skips every cleanup the run would do."""


def die_after_checkpoint(at_step: int | None = None) -> TrainHooks:
    """Hooks that kill the run right after the checkpoint of `at_step` (of any step when None) is saved."""
    def after_checkpoint(step, path):
        assert path.is_dir() and path.name == f"step-{step:08d}"
        if at_step is None or step == at_step:
            raise Killed
    return TrainHooks(after_checkpoint=after_checkpoint)


@pytest.mark.slow
def test_killed_and_resumed_run_matches_uninterrupted(cache_dir, student_config, tmp_path, uninterrupted):
    whole = uninterrupted
    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):  # epochs of 48 rows / 4 = 12 batches = 6 steps: dies at an epoch's end
        train_student(cache_dir, resumed, student_config=str(student_config), progress=False,
                      settings=TrainSettings(**SETTINGS), hooks=die_after_checkpoint(6))
    staging = tmp_path / "resumed.partial"
    assert sorted(p.name for p in (staging / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    with pytest.raises(KDCacheError, match="holds checkpoints of an interrupted run"):
        train_student(cache_dir, resumed, student_config=str(student_config), progress=False,
                      settings=TrainSettings(**SETTINGS))

    # Dies again, now mid-epoch at step 4, then resumes from there with the CLI-level --resume path.
    (staging / "checkpoints" / "step-00000006").rename(staging / "checkpoints" / "removed")
    summary = train_student(cache_dir, resumed, student_config=str(student_config), progress=False, resume=True,
                            settings=TrainSettings(**{**SETTINGS, "prefetch": 0, "log_every": 3}))
    assert summary["steps"] == 7
    assert_same_weights(whole, resumed)
    lines = lambda path: [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    strip = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]
    assert strip(lines(whole)) == strip(lines(resumed))


@pytest.mark.slow
def test_resume_from_a_checkpoint_into_a_new_output(cache_dir, student_config, tmp_path, uninterrupted):
    whole = uninterrupted
    branch = tmp_path / "branch"
    train_student(cache_dir, branch, student_config=str(student_config), progress=False,
                  resume_from=whole / "checkpoints" / "step-00000006", settings=TrainSettings(**SETTINGS))  # an epoch end
    assert_same_weights(whole, branch)


def test_resume_refuses_different_settings(cache_dir, student_config, tmp_path):
    first = tmp_path / "first"
    train_student(cache_dir, first, student_config=str(student_config), progress=False,
                  settings=TrainSettings(max_steps=2, batch_size=4, save_every=1))
    with pytest.raises(KDCacheError, match="different batch_size"):
        train_student(cache_dir, tmp_path / "second", student_config=str(student_config), progress=False,
                      resume_from=first / "checkpoints" / "step-00000001",
                      settings=TrainSettings(max_steps=2, batch_size=2, save_every=1))
    with pytest.raises(KDCacheError, match="not a kdcache checkpoint"):
        train_student(cache_dir, tmp_path / "third", student_config=str(student_config), progress=False,
                      resume_from=first, settings=TrainSettings(max_steps=2, batch_size=4))


@pytest.mark.slow
def test_resume_with_validation_restores_best_state_and_patience(cache_dir, student_config, tmp_path):
    """Held-out KLs are scripted: best at step 2, worse at 4 and 6, so patience 2 stops at step 6 and the
    step-2 state is saved. Killed at step 5, the resumed run has step 2's weights only in the checkpoint's
    snapshot and must know one evaluation already went without improvement; neither run trains on held-out ids."""
    from kdcache import open_cache

    def scripted(log: list, **hooks) -> TrainHooks:
        """Held-out KLs 0.3, 0.5, 0.6; each trained micro-batch's (epoch, sample ids) appended to `log`."""
        kls = iter([0.3, 0.5, 0.6])
        return TrainHooks(on_batch=lambda epoch, ids: log.extend((epoch, sample_id) for sample_id in ids),
                          evaluate=lambda model, cache, *, batch_size, sample_ids: {
                              "kl_to_teacher": next(kls), "top1_agreement": 0.0, "nll": 1.0, "perplexity": 2.0},
                          **hooks)

    settings = TrainSettings(**{**SETTINGS, "max_steps": 10, "grad_accum": 1, "save_every": 5, "prefetch": 0,
                                "val_fraction": 0.25, "eval_every": 2, "early_stopping": 2})
    whole_log, resumed_log = [], []
    whole = train_student(cache_dir, tmp_path / "whole", student_config=str(student_config), progress=False,
                          settings=settings, hooks=scripted(whole_log))
    assert whole["steps"] == 6 and whole["validation"]["stopped_early"] and whole["validation"]["best_step"] == 2

    hooks = scripted(resumed_log, after_checkpoint=die_after_checkpoint().after_checkpoint)
    with pytest.raises(Killed):
        train_student(cache_dir, tmp_path / "resumed", student_config=str(student_config), progress=False,
                      settings=settings, hooks=hooks)
    # the evaluations and trained batches of the killed run count: the resumed run continues both scripts
    resumed = train_student(cache_dir, tmp_path / "resumed", student_config=str(student_config), progress=False,
                            settings=settings, resume=True, hooks=dataclasses.replace(hooks, after_checkpoint=None))
    assert resumed["steps"] == 6 and resumed["validation"] == whole["validation"]
    assert_same_weights(tmp_path / "whole", tmp_path / "resumed")

    assert whole_log == resumed_log, "the resumed run replays exactly the uninterrupted order"
    trained_ids = {sample_id for _, sample_id in whole_log}
    heldout = open_cache(cache_dir).split(0.25).heldout
    assert trained_ids and not trained_ids & heldout
