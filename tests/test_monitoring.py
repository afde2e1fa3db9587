"""train-student reports every loss term, the learning rate and held-out scores to experiment trackers
(through Accelerate), with the same values as metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import kdcache


def test_tensorboard_gets_every_logged_value(cache_dir, student_config, tmp_path):
    out = tmp_path / "student"
    kdcache.train_student(cache_dir, out, student_config=str(student_config), progress=False,
                          settings=kdcache.TrainSettings(max_steps=4, batch_size=4, ce_weight=0.5, log_every=1,
                                                         val_fraction=0.25, eval_every=2, report_to="tensorboard"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for name in ("loss", "ce", "kd", "lr", "tokens_per_second", "val_kl_to_teacher", "val_nll"):
        logged = [(record["step"], record[name]) for record in records if name in record]
        scalars = [(event.step, event.value) for event in events.Scalars(name)]
        assert logged and scalars == [(step, pytest.approx(value, rel=1e-5)) for step, value in logged], name


@pytest.mark.parametrize("report_to, fragment", [("tensorbored", "not a tracker Accelerate knows"),
                                                 ("aim", "its package is not installed (pip install aim)")])
def test_an_unusable_tracker_is_refused_before_training(cache_dir, student_config, tmp_path, report_to, fragment):
    with pytest.raises(kdcache.KDCacheError, match=f"`report_to` .*{fragment}".replace("(", r"\(").replace(")", r"\)")):
        kdcache.train_student(cache_dir, tmp_path / "student", student_config=str(student_config), progress=False,
                              settings=kdcache.TrainSettings(max_steps=1, report_to=report_to))
    assert not (tmp_path / "student").exists() and not (tmp_path / "student.partial").exists()
