"""Warnings when training looks wrong (issue 23, item 2): one `KDCacheWarning` each, the run goes on.

A tokenizer that does not fit the text (dump: [UNK] share), degenerate targets and a loss that does not
fall (train-student), a student no closer to the teacher than a CE-only baseline (eval --baseline); and
none of them on a sound run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LANGUAGE, MINILM_DIR, tiny_llama_config
from transformers import AutoModelForCausalLM

from kdcache import DumpSettings, KDCacheWarning, TrainSettings, dump_teacher, import_dataset, train_student
from kdcache.cli import main
from kdcache.demo.synthetic import build_word_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def kdcache_warnings(run) -> list[str]:
    """The messages of the `KDCacheWarning`s `run()` emits (every one, even if emitted before)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(warning.message) for warning in caught if issubclass(warning.category, KDCacheWarning)]


def corpus_words(corpus: Path) -> int:
    return sum(len(json.loads(line)["text"].split()) for line in corpus.read_text().splitlines())


@pytest.fixture(scope="module")
def mismatched_teacher(tmp_path_factory) -> Path:
    """A tiny teacher whose word-level vocabulary holds none of the corpus's words: every word becomes [UNK]."""
    tokenizer = build_word_tokenizer([f"x{word}" for word in LANGUAGE.words])
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("mismatched-teacher")
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def unknown_cache(tmp_path_factory, mismatched_teacher, corpus) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("unknown") / "cache"
    caught = kdcache_warnings(lambda: dump_teacher(str(mismatched_teacher), str(corpus), out,
                                                   DumpSettings(top_k=4, batch_size=8), progress=False))
    return out, caught


def test_dump_warns_once_when_the_tokenizer_maps_the_text_to_unknown(unknown_cache, corpus):
    out, caught = unknown_cache
    words = corpus_words(corpus)
    assert caught == [f"100% of the tokens of the first 48 rows are the unknown token [UNK] ({words} of {words}): "
                      f"the tokenizer does not fit this text (another language, alphabet or vocabulary?), so the "
                      f"teacher sees little of it and its targets are degenerate"]
    manifest = json.loads((out / "kdcache.json").read_text())
    # [BOS] is special: not counted, so the share is over the words alone
    assert manifest["stats"]["unknown_tokens"] == {"token": "[UNK]", "unknown": words, "tokens": words,
                                                   "share": 1.0, "rows": 48}


def test_dump_with_a_fitting_tokenizer_does_not_warn_and_records_no_unknown(tmp_path, teacher_dir, corpus):
    out = tmp_path / "cache"
    assert kdcache_warnings(lambda: dump_teacher(str(teacher_dir), str(corpus), out,
                                                 DumpSettings(top_k=4, batch_size=8), progress=False)) == []
    stats = json.loads((out / "kdcache.json").read_text())["stats"]
    words = corpus_words(corpus)
    assert stats["unknown_tokens"] == {"token": "[UNK]", "unknown": 0, "tokens": words, "share": 0.0, "rows": 48}


def test_cli_shows_the_warning_as_one_line_and_info_shows_the_share(tmp_path, mismatched_teacher, corpus,
                                                                      unknown_cache):
    result = CliRunner().invoke(main, ["dump-teacher", "--teacher", str(mismatched_teacher), "--data", str(corpus),
                                       "--out", str(tmp_path / "cache"), "--top-k", "4", "--limit", "5"])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stderr.splitlines() if "unknown token" in line]
    assert line.startswith("Warning: 100% of the tokens of the first 5 rows are the unknown token [UNK]")
    assert "unknown      100.00% of the data's tokens are [UNK]" in result.stdout
    info = CliRunner().invoke(main, ["info", str(unknown_cache[0])]).stdout
    words = str(corpus_words(corpus))
    assert f"unknown      100.00% of the data's tokens are [UNK] ({words} of {words} in the first 48 rows)" in info


def test_info_on_a_cache_dumped_before_the_unknown_share_was_recorded(tmp_path):
    result = CliRunner().invoke(main, ["info", str(FIXTURES / "v4_cache")])
    assert result.exit_code == 0, result.output
    assert "fidelity" in result.stdout and "unknown " not in result.stdout


def test_training_on_a_cache_of_unknown_tokens_warns_that_the_targets_are_degenerate(unknown_cache, student_config,
                                                                                      tmp_path):
    settings = TrainSettings(max_steps=4, log_every=2, lr=3e-3)
    caught = kdcache_warnings(lambda: train_student(unknown_cache[0], tmp_path / "student",
                                                    student_config=str(student_config), settings=settings,
                                                    progress=False))
    assert caught == ["the targets look degenerate in the first 2 steps: 100% of the input tokens are the unknown "
                      "token [UNK] (the teacher's tokenizer does not fit the text): the student will learn little "
                      "from them"]


def imported_cache_warnings(tmp_path: Path, top1_ids, top_probabilities: list[float]) -> list[str]:
    """The warnings of 2 steps on 16 imported rows (DistillKit's format) of 16 positions whose top-1 ids are
    `top1_ids(rng)` and whose top-4 probabilities are `top_probabilities` everywhere."""
    rng = np.random.default_rng(0)
    rows = {"input_ids": [rng.integers(1000, 30_000, 16).tolist() for _ in range(16)],
            "token_ids": [[[int(top1_ids(rng)), *rng.integers(1000, 30_000, 3).tolist()] for _ in range(16)]
                          for _ in range(16)],
            "top_values": [[np.log(top_probabilities).tolist()] * 16] * 16}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "distillkit"))
    import_dataset(str(tmp_path / "distillkit"), tmp_path / "cache", "distillkit", tokenizer=MINILM_DIR)
    config = tmp_path / "student.json"
    config.write_text(tiny_llama_config(30522, hidden=16, layers=1).to_json_string())
    settings = TrainSettings(max_steps=2, batch_size=4, log_every=1, kd_weight=1.0)
    return kdcache_warnings(lambda: train_student(tmp_path / "cache", tmp_path / "student", student_config=str(config),
                                                  settings=settings, progress=False))


def test_training_on_targets_with_one_top1_everywhere_warns(tmp_path):
    assert imported_cache_warnings(tmp_path, lambda rng: 2000, [0.5, 0.2, 0.2, 0.1]) == [
        "the targets look degenerate in the first 1 steps: the teacher's top-1 is id 2000 at 100.0% of the positions: "
        "the student will learn little from them"]


def test_training_on_targets_of_zero_entropy_warns(tmp_path):
    assert imported_cache_warnings(tmp_path, lambda rng: rng.integers(1000, 30_000), [0.9995, 1e-4, 1e-4, 1e-4]) == [
        "the targets look degenerate in the first 1 steps: the teacher is 99.9% sure at 100.0% of the positions "
        "(entropy ~0: the soft targets say no more than hard labels): the student will learn little from them"]


def train_warnings(cache: Path, student_config: Path, out: Path, **settings) -> list[str]:
    """The warnings of 4 epochs on `cache` (48 rows, batches of 8: 24 steps, the loss check due at step 6);
    KD only unless `settings` say otherwise, whatever the defaults."""
    settings = {"kd_weight": 1.0, "ce_weight": 0.0, "temperature": 1.0, **settings}
    return kdcache_warnings(lambda: train_student(cache, out, student_config=str(student_config), progress=False,
                                                  settings=TrainSettings(epochs=4, batch_size=8, log_every=2,
                                                                         warmup_ratio=0.05, **settings)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, student_config) -> dict:
    """Students with the warnings of their runs: KD at a sound learning rate, KD at a tiny one, and CE only
    (the baseline) with two seeds."""
    root = tmp_path_factory.mktemp("trained")
    ce = {"lr": 3e-3, "kd_weight": 0.0, "ce_weight": 1.0}
    runs = {"kd": {"lr": 3e-3}, "tiny lr": {"lr": 1e-6}, "ce": ce, "ce seed 1": ce | {"seed": 1}}
    return {name: (root / name, train_warnings(cache_dir, student_config, root / name, **settings))
            for name, settings in runs.items()}


def test_a_loss_that_does_not_fall_warns_naming_the_learning_rate(trained):
    caught = trained["tiny lr"][1]
    assert len(caught) == 1, caught
    assert caught[0].startswith("the training loss has not fallen after 6 of 24 steps (")
    assert caught[0].endswith(") with `lr` 1e-06: try a larger `lr` (e.g. 10×)")


def test_a_sound_run_does_not_warn(trained):
    assert trained["kd"][1] == []


def eval_warnings(cache: Path, student: Path, baseline: Path) -> list[str]:
    result = CliRunner().invoke(main, ["eval", "--cache", str(cache), "--student", str(student),
                                       "--baseline", str(baseline), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert str(student) in result.stdout and str(baseline) in result.stdout  # both rows in the table
    return [line for line in result.stderr.splitlines() if line.startswith("Warning:")]


def test_eval_warns_when_a_student_is_no_closer_to_the_teacher_than_the_ce_baseline(cache_dir, trained):
    """A student that did not use the soft targets (CE with another seed) is as far as the baseline."""
    far, baseline = trained["ce seed 1"][0], trained["ce"][0]
    [line] = eval_warnings(cache_dir, far, baseline)
    assert line.startswith(f"Warning: {far} is still far from the teacher: KL ")
    assert line.endswith("distillation gained little: try a larger --lr or more steps (a --val-fraction run shows "
                         "when the held-out KL stops falling)")
    assert eval_warnings(cache_dir, trained["kd"][0], baseline) == []
