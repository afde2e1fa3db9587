"""Token classification (NER): the cache equals a direct forward, each word targets its first sub-token,
bad data is refused, a student learns the teacher, and dumps and runs resume exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from conftest import MINILM_DIR, NER_LABELS, disk_full_during_second_shard, ner_rows, tiny_bert, write_rows
from kdcache import open_cache
from kdcache.cache.format import Manifest
from kdcache.errors import KDCacheError
from kdcache.models import model_from_config
from kdcache.student import TrainHooks, TrainSettings, evaluate, train_student
from kdcache.tasks import get_task
from kdcache.teacher import DumpSettings, dump_teacher


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ner-data")
    return {"train": write_rows(directory / "train.jsonl", ner_rows(64, seed=1)),
            "test": write_rows(directory / "test.jsonl", ner_rows(24, seed=2))}


@pytest.fixture(scope="module")
def ner_cache(tmp_path_factory, ner_teacher, ner_data):
    out = tmp_path_factory.mktemp("ner-caches") / "cache"
    dump_teacher(str(ner_teacher), str(ner_data["train"]), out,
                 DumpSettings(batch_size=8, shard_rows=24, hidden_layers=(-1,)), progress=False)
    return out


@pytest.fixture(scope="module")
def student_config_dir(tmp_path_factory, wordpiece):
    path = tmp_path_factory.mktemp("bert-student") / "student.json"
    config = tiny_bert(wordpiece, layers=1, hidden=16).to_dict()
    path.write_text(json.dumps(config))
    return path


def test_token_classification_cache_equals_a_direct_forward(ner_cache, ner_teacher, ner_data, wordpiece):
    manifest = Manifest.load(ner_cache)
    assert manifest.task == "token-classification" and manifest.labels == NER_LABELS
    assert manifest.top_k == 5, "5 labels: the full distribution is stored"
    assert set(manifest.optional_columns) == {"target_positions", "labels"}
    open_cache(ner_cache).verify(progress=False)
    model = AutoModelForTokenClassification.from_pretrained(ner_teacher).eval()
    rows = [json.loads(line) for line in ner_data["train"].read_text().splitlines()]
    cached = {s.sample_id: s for s in open_cache(ner_cache).sequences(hidden_layers=[2])}
    assert sorted(cached) == list(range(len(rows)))
    for sample_id in (0, 9, len(rows) - 1):
        encoding = wordpiece(rows[sample_id]["tokens"], is_split_into_words=True)
        with torch.no_grad():
            output = model(torch.tensor([encoding["input_ids"]]), output_hidden_states=True)
        sequence = cached[sample_id]
        positions = sequence.target_positions.astype(np.int64)
        expected = torch.log_softmax(output.logits[0, positions].double(), dim=-1).numpy()
        # sorted descending over the 5 labels: put the cached values back in label order
        restored = np.full_like(expected, np.nan)
        np.put_along_axis(restored, sequence.topk_ids.astype(np.int64), sequence.topk_logprobs.astype(np.float64), 1)
        np.testing.assert_allclose(restored, expected, rtol=1e-3, atol=2e-3)
        assert np.all(np.isneginf(sequence.tail_logprob)), "full distribution: nothing outside the top-k"
        assert sequence.labels.tolist() == rows[sample_id]["ner_tags"]
        assert sequence.input_ids.tolist() == encoding["input_ids"]
        np.testing.assert_allclose(sequence.hidden[2].astype(np.float32), output.hidden_states[2][0].numpy(),
                                   atol=1e-2)


def test_each_word_targets_its_first_sub_token(tmp_path, ner_teacher, wordpiece):
    words = ["Schwarzenegger", "visited", "Ouagadougou", "unbelievably", "x"]
    tags = ["B-PER", "O", "B-LOC", "O", "O"]
    data = write_rows(tmp_path / "one.jsonl", [{"tokens": words, "ner_tags": tags}])  # string labels
    dump_teacher(str(ner_teacher), str(data), tmp_path / "cache", DumpSettings(), progress=False)
    sequence = next(open_cache(tmp_path / "cache").sequences())
    pieces = wordpiece.convert_ids_to_tokens(sequence.input_ids.tolist())
    assert len(pieces) > len(words) + 2, "the test needs words that split into several pieces"
    positions = sequence.target_positions.tolist()
    assert [pieces[p] for p in positions] == ["schwarz", "visited", "ou", "un", "x"]
    # every position that is not a word's first piece is a continuation piece or a special token
    others = [piece for index, piece in enumerate(pieces) if index not in positions]
    assert all(piece.startswith("##") or piece in ("[CLS]", "[SEP]") for piece in others)
    assert sequence.labels.tolist() == [NER_LABELS.index(tag) for tag in tags]


def test_truncation_drops_the_targets_of_cut_words(tmp_path, ner_teacher):
    data = write_rows(tmp_path / "long.jsonl", [{"tokens": ["Ouagadougou"] * 6, "ner_tags": [3] * 6}])
    dump_teacher(str(ner_teacher), str(data), tmp_path / "cache", DumpSettings(max_length=8),
                            progress=False)
    sequence = next(open_cache(tmp_path / "cache").sequences())
    assert len(sequence.input_ids) == 8 and len(sequence.labels) == len(sequence.target_positions) >= 1
    assert sequence.target_positions.max() < 7


def test_rows_without_words_are_dropped_and_listed(tmp_path, ner_teacher):
    rows = [{"tokens": ["Ouagadougou"], "ner_tags": [3]}, {"tokens": [], "ner_tags": []},
            {"tokens": ["x", "y"], "ner_tags": [0, 0]}, {"tokens": [], "ner_tags": []}]
    manifest = dump_teacher(str(ner_teacher), str(write_rows(tmp_path / "rows.jsonl", rows)), tmp_path / "cache",
                            DumpSettings(), progress=False)
    assert manifest.total_rows == 2
    assert manifest.stats["dropped_rows"] == {"no word to classify": {"count": 2, "sample_ids": [1, 3]}}


@pytest.mark.parametrize("case, fragment", [
    ("unknown-label", "label 'B-ORG' in column 'ner_tags' is not one of the teacher's labels"),
    ("label-count", "3 words but 2 labels"),
    ("no-tokens-column", "column 'tokens' not in dataset"),
    ("missing-labels-column", "column 'tags' not in dataset"),
])
def test_bad_token_classification_data(tmp_path, ner_teacher, case, fragment):
    rows = {"unknown-label": [{"tokens": ["a", "b"], "ner_tags": ["O", "B-ORG"]}],
            "label-count": [{"tokens": ["a", "b", "c"], "ner_tags": [0, 0]}],
            "no-tokens-column": [{"words": ["a"], "ner_tags": [0]}],
            "missing-labels-column": [{"tokens": ["a"], "ner_tags": [0]}]}[case]
    settings = DumpSettings(labels_column="tags" if case == "missing-labels-column" else None)
    with pytest.raises(KDCacheError, match=fragment):
        dump_teacher(str(ner_teacher), str(write_rows(tmp_path / "d.jsonl", rows)), tmp_path / "out", settings,
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_pooled_output_needs_a_pooler(tmp_path, ner_teacher, ner_data):
    with pytest.raises(KDCacheError, match="BertForTokenClassification has no pooler"):
        dump_teacher(str(ner_teacher), str(ner_data["test"]), tmp_path / "out", DumpSettings(pooled=True),
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_task_inference_refuses_a_bare_encoder(tmp_path, ner_data):
    from transformers import BertModel
    BertModel(tiny_bert(AutoTokenizer.from_pretrained(MINILM_DIR))).save_pretrained(tmp_path / "bare")
    AutoTokenizer.from_pretrained(MINILM_DIR).save_pretrained(tmp_path / "bare")
    with pytest.raises(KDCacheError, match=r"cannot infer the task .*BertModel.*set `task`"):
        dump_teacher(str(tmp_path / "bare"), str(ner_data["train"]), tmp_path / "out", DumpSettings(), progress=False)


def test_ce_weight_needs_gold_labels(tmp_path, ner_teacher, ner_data, student_config_dir):
    rows = [{"tokens": row["tokens"]} for row in ner_rows(4, seed=3)]
    cache = tmp_path / "cache"
    dump_teacher(str(ner_teacher), str(write_rows(tmp_path / "unlabelled.jsonl", rows)), cache, DumpSettings(),
                 progress=False)
    with pytest.raises(KDCacheError, match="cache holds no gold labels"):
        train_student(cache, tmp_path / "s", student_config=str(student_config_dir), progress=False,
                      settings=TrainSettings(ce_weight=1.0))
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_student_with_other_labels_is_refused(tmp_path, ner_cache, wordpiece):
    other = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # same count, another order
    AutoModelForTokenClassification.from_config(tiny_bert(wordpiece, layers=1, num_labels=5,
                                                          id2label=dict(enumerate(other)))).save_pretrained(tmp_path / "m")
    with pytest.raises(KDCacheError, match=r"student labels \(O, B-LOC.*\) differ from the cache's \(O, B-PER"):
        train_student(ner_cache, tmp_path / "s", student=str(tmp_path / "m"), progress=False)


@pytest.mark.slow
def test_student_learns_the_ner_teacher(tmp_path, ner_cache, ner_teacher, ner_data, student_config_dir):
    test_cache = tmp_path / "test-cache"
    dump_teacher(str(ner_teacher), str(ner_data["test"]), test_cache, DumpSettings(), progress=False)
    manifest = Manifest.load(ner_cache)
    task = get_task(manifest.task)
    torch.manual_seed(0)
    untrained = model_from_config(str(student_config_dir), manifest.vocab_size, task.auto_class,
                                  **task.student_config_overrides(manifest))
    trained = tmp_path / "trained"
    train_student(ner_cache, trained, student_config=str(student_config_dir), progress=False,
                  settings=TrainSettings(max_steps=30, batch_size=16, lr=5e-3, ce_weight=0.1, hidden_weight=0.1,
                                         hidden_loss="cosine"))
    before = evaluate(untrained, test_cache)
    after = evaluate(AutoModelForTokenClassification.from_pretrained(trained), test_cache)
    assert after["kl_to_teacher"] < 0.6 * before["kl_to_teacher"]
    assert after["student_vs_teacher"]["accuracy"] > before["student_vs_teacher"]["accuracy"] + 0.2
    assert after["student_vs_teacher"]["entity_f1"] > before["student_vs_teacher"]["entity_f1"]
    assert after["teacher_vs_gold"] == before["teacher_vs_gold"], "the teacher's side comes from the cache"
    assert AutoModelForTokenClassification.from_pretrained(trained).config.id2label[1] == "B-PER"


@pytest.mark.parametrize("targets", ["sampled", "both"])
def test_sampled_targets_are_refused_for_classification(tmp_path, ner_teacher, ner_data, targets):
    with pytest.raises(KDCacheError) as error:
        dump_teacher(str(ner_teacher), str(ner_data["test"]), tmp_path / "out", DumpSettings(targets=targets),
                     progress=False)
    message = str(error.value)
    assert f"`targets` {targets} is for causal LMs" in message and "use `targets` topk" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_train_student_refuses_sampled_targets_on_a_classification_cache(tmp_path, ner_cache, student_config_dir):
    with pytest.raises(KDCacheError, match=r"`targets` sampled: .* \(classification caches hold top-k targets only\)"):
        train_student(ner_cache, tmp_path / "s", student_config=str(student_config_dir), progress=False,
                      settings=TrainSettings(targets="sampled"))
    assert not (tmp_path / "s").exists()


def test_classification_fidelity_card_is_exact(ner_cache):
    """Five labels are stored in full, so the card reports nothing lost but float16 rounding, over every target."""
    manifest = Manifest.load(ner_cache)
    card = manifest.stats["fidelity"]
    assert set(card) == {"positions", "every", "topk"} and card["topk"]["top_k"] == manifest.top_k == 5
    sequences = list(open_cache(ner_cache).sequences())
    targets = sum(len(s.target_positions) for s in sequences)
    # every 8th target of each batch (at most one extra per batch), counted over targets, not tokens
    assert card["every"] == 8 and targets / 8 <= card["positions"] <= targets / 8 + len(sequences)
    assert targets < manifest.total_tokens
    assert card["topk"]["captured_mass"] == pytest.approx(1.0, abs=1e-6)
    assert card["topk"]["kl_rest_bucket"] == pytest.approx(0, abs=1e-5)
    assert card["topk"]["tv_rest_bucket"] == pytest.approx(0, abs=1e-3)


def test_an_interrupted_token_classification_dump_resumes_to_the_same_cache(tmp_path, ner_cache, ner_teacher,
                                                                            ner_data):
    """Disk full on the second shard, then a rerun: shards equal an uninterrupted dump's, labels and
    target positions included, and the card and teacher NLL count each target once."""
    out = tmp_path / "cache"
    settings = DumpSettings(batch_size=8, shard_rows=24, hidden_layers=(-1,))  # those of `ner_cache`
    with pytest.raises(KDCacheError, match="No space left on device"):
        dump_teacher(str(ner_teacher), str(ner_data["train"]), out, settings, progress=False,
                     hooks=disk_full_during_second_shard(Manifest.load(ner_cache)))

    manifest = dump_teacher(str(ner_teacher), str(ner_data["train"]), out, settings, progress=False)
    expected = Manifest.load(ner_cache)
    assert manifest.stats["resumed_shards"] == 1
    assert len(manifest.shards) == 3 and manifest.shards == expected.shards
    assert manifest.optional_columns == expected.optional_columns and manifest.labels == NER_LABELS
    for name in ("fidelity", "teacher_nll", "content_sha256"):
        assert manifest.stats[name] == expected.stats[name], name
    open_cache(out).verify(progress=False)


def test_validation_and_held_out_eval_on_a_classification_cache(tmp_path, ner_cache, student_config_dir):
    """--val-fraction holds rows out of classification training, and `eval --split-fraction` scores the same rows."""
    summary = train_student(ner_cache, tmp_path / "student", student_config=str(student_config_dir), progress=False,
                            settings=TrainSettings(max_steps=4, batch_size=8, lr=5e-3, val_fraction=0.25,
                                                   eval_every=2))
    heldout = open_cache(ner_cache).split(0.25).heldout
    validation = summary["validation"]
    assert validation["heldout_sequences"] == len(heldout) == 16
    assert set(validation["last"]) == {"step", "val_kl_to_teacher", "best_step"}
    scores = evaluate(AutoModelForTokenClassification.from_pretrained(tmp_path / "student"), ner_cache,
                              sample_ids=heldout)
    assert scores["rows"] == 16 and "entity_f1" in scores["student_vs_teacher"]
    assert scores["kl_to_teacher"] == pytest.approx(validation["best_val_kl_to_teacher"], rel=1e-4), \
        "the saved student is the best held-out state"


@pytest.mark.slow
def test_resumed_token_classification_run_matches_uninterrupted(tmp_path, ner_cache, student_config_dir):
    """Checkpoints of an encoder task hold its extra state: the hidden-state projection (16 -> 32 wide)
    and the validation bookkeeping; a run killed mid-epoch and resumed ends bitwise equal."""

    settings = TrainSettings(max_steps=7, batch_size=4, ce_weight=0.5, hidden_weight=1.0, hidden_loss="cosine",
                             lr=5e-3, seed=3, shuffle_buffer=8, val_fraction=0.25, eval_every=3, save_every=2)
    train = lambda out, **options: train_student(ner_cache, out, student_config=str(student_config_dir),
                                                 progress=False, settings=settings, **options)
    train(tmp_path / "whole")

    class Killed(Exception):
        pass

    def die_at_step_4(step, checkpoint):
        if step == 4:  # 48 training rows / 4 = 12 batches an epoch: mid-epoch, after one validation
            raise Killed

    with pytest.raises(Killed):
        train(tmp_path / "resumed", hooks=TrainHooks(after_checkpoint=die_at_step_4))
    summary = train(tmp_path / "resumed", resume=True)
    assert summary["steps"] == 7 and summary["validation"]["heldout_sequences"] == 16
    for load in (lambda path: AutoModelForTokenClassification.from_pretrained(path).state_dict(),
                 lambda path: torch.load(path / "kdcache_projections.pt")):
        whole, resumed = load(tmp_path / "whole"), load(tmp_path / "resumed")
        assert whole.keys() == resumed.keys() and whole  # the projection file holds a learned 16 -> 32 map
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), name


def test_ner_from_the_command_line(tmp_path, ner_teacher, ner_data):
    from click.testing import CliRunner

    from kdcache.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(arg) for arg in args])
        assert result.exit_code == 0, result.output
        return result.stdout

    cache, student = tmp_path / "cache", tmp_path / "student"
    run("dump-teacher", "--teacher", ner_teacher, "--data", ner_data["test"], "--out", cache, "--hidden-layers", "-1")
    assert "token-classification  (labels: O, B-PER, I-PER, B-LOC, I-LOC)" in run("info", cache)
    run("init-student", "--teacher", ner_teacher, "--layers", "1", "--out", student)
    run("train-student", "--cache", cache, "--student", student, "--out", tmp_path / "trained", "--max-steps", 2,
        "--ce-weight", 0.5, "--hidden-weight", 1, "--hidden-loss", "cosine", "--layer-map", "1:2")
    header, columns, teacher, trained = run("eval", "--cache", cache, "--student", tmp_path / "trained").splitlines()
    assert "ent F1 vs T" in columns and "ent F1 vs gold" in columns
    assert teacher.startswith("teacher (cached)") and trained.startswith(str(tmp_path / "trained"))
    [scores] = json.loads(run("eval", "--cache", cache, "--student", tmp_path / "trained", "--json"))
    assert 0 <= scores["student_vs_gold"]["entity_f1"] <= 1


def test_partly_labelled_rows_get_teacher_targets_and_no_gold(tmp_path, ner_teacher, student_config_dir):
    """Gold sentences plus raw text for the teacher to label (null labels), as in the CoNLL --unlabeled run."""
    rows = ner_rows(6, seed=4)
    partly = rows[:3] + [{"tokens": row["tokens"], "ner_tags": None} for row in rows[3:]]
    dump_teacher(str(ner_teacher), str(write_rows(tmp_path / "partly.jsonl", partly)), tmp_path / "cache",
                 DumpSettings(), progress=False)
    sequences = {sequence.sample_id: sequence for sequence in open_cache(tmp_path / "cache").sequences()}
    assert sorted(sequences) == list(range(6))
    assert [bool((sequences[i].labels == -100).all()) for i in range(6)] == [False] * 3 + [True] * 3
    summary = train_student(tmp_path / "cache", tmp_path / "s", student_config=str(student_config_dir), progress=False,
                            settings=TrainSettings(max_steps=2, batch_size=6, ce_weight=1.0))
    assert np.isfinite(summary["final"]["ce"])
    dump_teacher(str(ner_teacher), str(write_rows(tmp_path / "gold.jsonl", rows[:3])), tmp_path / "gold",
                 DumpSettings(), progress=False)
    student = AutoModelForTokenClassification.from_pretrained(tmp_path / "s")
    mixed, gold_only = evaluate(student, tmp_path / "cache"), evaluate(student, tmp_path / "gold")
    assert mixed["student_vs_gold"] == gold_only["student_vs_gold"], "gold scores cover the labelled rows only"
    assert mixed["rows"] == 6 and gold_only["rows"] == 3
