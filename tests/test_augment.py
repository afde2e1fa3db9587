"""dump-teacher `augment`: teacher-labelled variants of the rows, seeded and recorded, never with the
original's gold labels."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import OTHER, ner_rows, write_rows
from kdcache import DistillationLoss, KDCacheError, TrainSettings, collate, dump_teacher, open_cache
from kdcache.cli import main
from kdcache.teacher import DumpSettings


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("ner-data") / "train.jsonl", ner_rows(12, seed=5))


def sequences(cache) -> dict:
    return {sequence.sample_id: sequence for sequence in open_cache(cache).sequences()}


def test_variants_follow_the_rows_seeded_and_without_gold(tmp_path, ner_teacher, ner_data):
    plain = dump_teacher(str(ner_teacher), str(ner_data), tmp_path / "plain", DumpSettings(), progress=False)
    augmented = dump_teacher(str(ner_teacher), str(ner_data), tmp_path / "a", DumpSettings(augment=3), progress=False)
    again = dump_teacher(str(ner_teacher), str(ner_data), tmp_path / "b", DumpSettings(augment=3), progress=False)
    assert [shard.sha256 for shard in augmented.shards] == [shard.sha256 for shard in again.shards]
    assert augmented.dataset["augmentation"] == {"variants_per_row": 3, "methods": ["mentions", "substitute"],
                                                 "rate": 0.3, "seed": 0, "original_rows": 12, "variant_rows": 36}
    assert plain.dump_fingerprint != augmented.dump_fingerprint
    originals, rows = sequences(tmp_path / "plain"), sequences(tmp_path / "a")
    assert sorted(rows) == list(range(48))
    for sample_id, original in originals.items():  # the originals keep their ids, tokens, targets and gold
        assert rows[sample_id].input_ids.tolist() == original.input_ids.tolist()
        assert rows[sample_id].labels.tolist() == original.labels.tolist()
        assert torch.equal(torch.as_tensor(rows[sample_id].topk_logprobs), torch.as_tensor(original.topk_logprobs))
    variants = [rows[sample_id] for sample_id in range(12, 48)]
    assert all((variant.labels == -100).all() for variant in variants), "a variant never keeps the original's gold"
    changed = sum(variant.input_ids.tolist() != rows[variant.sample_id % 12].input_ids.tolist() for variant in variants)
    assert changed == 36, f"only {changed} of 36 variants differ from their row"
    other = dump_teacher(str(ner_teacher), str(ner_data), tmp_path / "c", DumpSettings(augment=3, seed=1),
                         progress=False)
    assert [shard.sha256 for shard in other.shards] != [shard.sha256 for shard in augmented.shards]


def test_mention_swaps_keep_the_other_words_and_the_entity_types(tmp_path, ner_teacher, ner_data, wordpiece):
    dump_teacher(str(ner_teacher), str(ner_data), tmp_path / "cache",
                 DumpSettings(augment=4, augment_methods="mentions"), progress=False)
    rows = [json.loads(line) for line in ner_data.read_text().splitlines()]
    cached = sequences(tmp_path / "cache")
    for sample_id in range(12, 60):
        row = rows[sample_id % 12]
        words = wordpiece.decode(cached[sample_id].input_ids, skip_special_tokens=True).split()
        others = [word for word, tag in zip(row["tokens"], row["ner_tags"]) if tag == 0]
        assert [word for word in words if word in {w.lower() for w in OTHER}] == [w.lower() for w in others]
        has_mention = any(row["ner_tags"])
        assert (words != " ".join(row["tokens"]).lower().split()) == has_mention, "changed exactly where a mention is"


def test_info_and_the_card_say_how_many_rows_are_variants(tmp_path, ner_teacher, ner_data):
    dump_teacher(str(ner_teacher), str(ner_data), tmp_path / "cache", DumpSettings(augment=2), progress=False)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "augmented    24 of the rows are teacher-labelled variants (2 per original row" in result.output
    assert "24 of the rows are teacher-labelled variants" in (tmp_path / "cache" / "README.md").read_text()


@pytest.mark.parametrize("settings, fragment", [
    ({"augment_methods": "swap"}, "`augment_methods` must be a comma-separated list"),
    ({"augment_methods": "substitute,mask"}, "choose one of substitute and mask"),
    ({"augment": -1}, "`augment` must not be negative"),
    ({"augment_rate": 1.5}, "`augment_rate` must be below 1"),
])
def test_bad_augmentation_settings_are_refused(settings, fragment):
    with pytest.raises(KDCacheError, match=fragment):
        DumpSettings(**{"augment": 2, **settings})


def test_mention_swaps_need_tagged_token_classification(tmp_path, teacher_dir, corpus):
    with pytest.raises(KDCacheError, match="mentions needs token classification data with gold tags"):
        dump_teacher(str(teacher_dir), str(corpus), tmp_path / "cache",
                     DumpSettings(augment=1, augment_methods="mentions"), progress=False)
    assert not (tmp_path / "cache" / "kdcache.json").exists()


def test_the_command_line_refuses_bad_methods_in_one_line(tmp_path, ner_teacher, ner_data):
    result = CliRunner().invoke(main, ["dump-teacher", "--teacher", str(ner_teacher), "--data", str(ner_data),
                                       "--out", str(tmp_path / "cache"), "--augment", "2",
                                       "--augment-methods", "shuffle"])
    assert result.exit_code != 0
    assert result.output.strip() == ("Error: --augment-methods must be a comma-separated list of mentions, "
                                      "substitute, mask, got 'shuffle'")
    assert "Traceback" not in result.output


def test_causal_lm_variants_train_kd_only(tmp_path, teacher_dir, corpus):
    """A variant's words were changed, so the text is no longer its own label: CE skips it, KD does not."""
    dump_teacher(str(teacher_dir), str(corpus), tmp_path / "cache", DumpSettings(augment=1, limit=6),
                 progress=False)
    cache = open_cache(tmp_path / "cache")
    assert cache.manifest.dataset["augmentation"]["original_rows"] == 6
    rows = sorted(cache.sequences(), key=lambda sequence: sequence.sample_id)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "cache" / "tokenizer")
    texts = [tokenizer.decode(row.input_ids) for row in rows]
    assert sum(texts[index] != texts[index + 6] for index in range(6)) >= 5
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    loss = DistillationLoss(TrainSettings(ce_weight=1.0), cache, model)
    batch = collate(rows)
    labels = loss.gold_labels(batch)
    rows_of_positions = torch.arange(len(rows))[:, None].expand_as(batch.valid)[batch.valid]
    variant = rows_of_positions >= 6
    assert (labels[variant] == -100).all()
    assert torch.equal(labels[~variant], batch.next_token_labels()[~variant])
    assert (labels[~variant] != -100).sum() > 0
