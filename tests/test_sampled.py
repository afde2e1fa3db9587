"""Sampled targets and the fidelity card: unbiased, reproducible draws; card figures recomputed by hand."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache import open_cache
from kdcache.cache.format import Manifest
from kdcache.student.batching import collate
from kdcache.teacher import DumpSettings, dump_teacher
from kdcache.teacher.targets import sampled_targets, sampling_uniforms


def dump(teacher_dir, corpus, out, **settings):
    dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(**{"top_k": 8, "limit": 12, "codec": "plain", **settings}),
                 progress=False)
    return out


@pytest.fixture(scope="module")
def both_cache(tmp_path_factory, teacher_dir, corpus):
    return dump(teacher_dir, corpus, tmp_path_factory.mktemp("sampled") / "both", targets="both", samples=50,
                batch_size=5, shard_rows=5, fidelity_every=1)


def teacher_logprobs(teacher_dir, corpus, sample_id: int) -> torch.Tensor:
    """Full-vocabulary log-probs of one corpus row, from a direct transformers forward (float64)."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    text = json.loads(corpus.read_text().splitlines()[sample_id])["text"]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, :, :len(tokenizer)]
    return torch.log_softmax(logits.double(), dim=-1)


def counts_matrix(sequence, vocab: int) -> np.ndarray:
    """Dense [L, V] draw counts of one cached sequence."""
    ids, counts = sequence.sampled_ids, sequence.sampled_counts
    dense = np.zeros((len(ids), vocab))
    rows = np.repeat(np.arange(len(ids)), ids.lengths())
    dense[rows, ids.values.astype(np.int64)] = counts.values
    return dense


def test_sampled_columns_follow_the_contract(both_cache):
    manifest = Manifest.load(both_cache)
    open_cache(both_cache).verify(progress=False)
    assert manifest.target_types == ("topk", "sampled") and manifest.settings["samples"] == 50
    table = pa.ipc.open_file(str(both_cache / manifest.shards[0].file)).read_all()
    assert table.schema.field("sampled_ids").type == pa.list_(pa.list_(pa.uint16()))
    assert table.schema.field("sampled_counts").type == pa.list_(pa.list_(pa.uint16()))
    rows = datasets.load_dataset("arrow", data_files=[str(both_cache / shard.file) for shard in manifest.shards],
                                 split="train")
    assert len(rows) == 12 and len(rows[0]["sampled_ids"]) == len(rows[0]["input_ids"])
    for sequence in open_cache(both_cache).sequences():
        assert len(sequence.sampled_ids) == len(sequence.input_ids)
        per_position = np.add.reduceat(sequence.sampled_counts.values.astype(np.int64), sequence.sampled_ids.offsets[:-1])
        assert (per_position == 50).all(), "counts at each position sum to the number of draws"
        for position in range(len(sequence.input_ids)):
            ids = sequence.sampled_ids.values[sequence.sampled_ids.offsets[position]:sequence.sampled_ids.offsets[position + 1]]
            assert (np.diff(ids.astype(np.int64)) > 0).all(), "distinct ids, ascending"


def test_sampled_only_cache_has_no_topk_columns(tmp_path, teacher_dir, corpus):
    cache = dump(teacher_dir, corpus, tmp_path / "sampled", targets="sampled", samples=20, limit=4)
    manifest = Manifest.load(cache)
    assert manifest.target_types == ("sampled",) and "captured_mass" not in manifest.stats
    names = pa.ipc.open_file(str(cache / manifest.shards[0].file)).schema.names
    assert "topk_ids" not in names and "tail_logprob" not in names and "sampled_ids" in names
    batch = collate(list(open_cache(cache).sequences()))
    assert batch.topk_ids is None
    targets = batch.sparse_targets("sampled")
    assert targets.tail_logprob is None
    np.testing.assert_allclose(targets.logprobs.exp().sum(-1).numpy(), 1.0, rtol=1e-6)


def test_draws_are_unbiased_at_dump_level(tmp_path, teacher_dir, corpus):
    """Pooled over many draws, count / N converges to the teacher's probabilities from a direct forward."""
    draws = 60_000  # one dump of 60000 draws pools the same as averaging 1200 seeds of 50 draws
    cache = dump(teacher_dir, corpus, tmp_path / "many", targets="sampled", samples=draws, limit=2)
    manifest = Manifest.load(cache)
    sequence = next(iter(open_cache(cache).sequences()))
    estimate = counts_matrix(sequence, manifest.vocab_size) / draws
    p = teacher_logprobs(teacher_dir, corpus, sequence.sample_id).exp().numpy()
    sigma = np.sqrt(p * (1 - p) / draws)
    assert np.abs(estimate - p).max() < 0.01
    assert (np.abs(estimate - p) < 5 * sigma + 1e-9).mean() > 0.999
    assert abs(((estimate - p) / np.maximum(sigma, 1e-12)).mean()) < 0.05  # no systematic drift


@pytest.mark.parametrize("systematic", [False, True])
def test_mean_over_seeds_converges_to_the_teacher(systematic):
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    p = torch.softmax(logits.double(), -1)
    total = torch.zeros_like(p)
    seeds = 400
    for seed in range(seeds):
        drawn = sampled_targets(logits, sampling_uniforms([7], [3], 50, seed), vocab_size=40, systematic=systematic)
        rows = torch.repeat_interleave(torch.arange(3), drawn.offsets.diff())
        total.index_put_((rows, drawn.ids), drawn.counts.double() / 50, accumulate=True)
    assert torch.allclose(total / seeds, p, atol=0.01)
    # the vocabulary cut-off is respected: padded logit rows are never drawn
    padded = torch.cat([logits, torch.full((3, 4), 50.0)], dim=1)
    assert sampled_targets(padded, sampling_uniforms([7], [3], 50, 0), vocab_size=40).ids.max() < 40


def test_systematic_draws_stay_within_one_of_their_expectation():
    """Each count is floor or ceil of N·p (so ids with N·p < 1 are drawn at most once: N distinct ids on a flat
    distribution), and the estimate's squared error over seeds is below that of independent draws."""
    torch.manual_seed(2)
    logits = torch.cat([torch.randn(2, 300) * 3, torch.zeros(1, 300)])  # two peaked rows, one uniform
    p = torch.softmax(logits.double(), -1)
    errors = {}
    for systematic in (False, True):
        errors[systematic] = 0.0
        for seed in range(100):
            drawn = sampled_targets(logits, sampling_uniforms([3], [3], 16, seed), vocab_size=300, systematic=systematic)
            rows = torch.repeat_interleave(torch.arange(3), drawn.offsets.diff())
            counts = torch.zeros_like(p).index_put_((rows, drawn.ids), drawn.counts.double())
            errors[systematic] += float(((counts / 16 - p) ** 2).sum())
            if systematic:
                assert ((counts >= (16 * p).floor() - 1e-9) & (counts <= (16 * p).ceil() + 1e-9)).all()
                assert drawn.offsets.diff()[2] == 16, "a uniform row gets 16 distinct ids"
    assert errors[True] < 0.8 * errors[False]


def sampled_columns(cache) -> dict[int, tuple[list, list]]:
    return {s.sample_id: (s.sampled_ids.values.tolist(), s.sampled_counts.values.tolist())
            for s in open_cache(cache).sequences()}


def test_draws_are_reproducible_and_independent_of_batch_size(tmp_path, teacher_dir, corpus, both_cache):
    by_batches_of_one = sampled_columns(dump(teacher_dir, corpus, tmp_path / "b1", targets="both", samples=50,
                                             batch_size=1))
    assert by_batches_of_one == sampled_columns(both_cache)  # same seed, batch size 5 and 5-row shards
    other_seed = sampled_columns(dump(teacher_dir, corpus, tmp_path / "s1", targets="both", samples=50, seed=1))
    assert other_seed != by_batches_of_one


def test_fidelity_card_matches_an_independent_computation(both_cache, teacher_dir, corpus):
    manifest = Manifest.load(both_cache)
    card = manifest.stats["fidelity"]
    vocab, k = manifest.vocab_size, manifest.top_k
    sums = {"kl_rest_bucket": 0.0, "topk_mass": 0.0, "tv_rest_bucket": 0.0, "sampled_mass": 0.0,
            "kl_on_support": 0.0, "tv": 0.0, "distinct_ids": 0.0}
    positions = 0
    for sequence in open_cache(both_cache).sequences():
        p = teacher_logprobs(teacher_dir, corpus, sequence.sample_id).exp().numpy()
        for row in p:
            order = np.argsort(-row)
            head, rest = order[:k], order[k:]
            tail = row[rest].sum()
            sums["topk_mass"] += row[head].sum()
            sums["kl_rest_bucket"] += np.sum(row[rest] * np.log(row[rest] * (vocab - k) / tail))
            sums["tv_rest_bucket"] += 0.5 * np.abs(row[rest] - tail / (vocab - k)).sum()
        estimate = counts_matrix(sequence, vocab) / manifest.settings["samples"]
        for row, est in zip(p, estimate):
            drawn = est > 0
            mass = row[drawn].sum()
            sums["sampled_mass"] += mass
            sums["kl_on_support"] += np.sum(row[drawn] / mass * np.log(row[drawn] / mass / est[drawn]))
            sums["tv"] += 0.5 * np.abs(row - est).sum()
            sums["distinct_ids"] += drawn.sum()
        positions += len(p)
    assert card["positions"] == positions == manifest.total_tokens
    expected = {"topk": {"captured_mass": "topk_mass", "kl_rest_bucket": "kl_rest_bucket",
                         "tv_rest_bucket": "tv_rest_bucket"},
                "sampled": {"captured_mass": "sampled_mass", "kl_on_support": "kl_on_support", "tv": "tv",
                            "distinct_ids": "distinct_ids"}}
    for kind, names in expected.items():
        for name, key in names.items():
            assert card[kind][name] == pytest.approx(sums[key] / positions, rel=2e-3, abs=1e-5), (kind, name)
    assert card["topk"]["top_k"] == k and card["sampled"]["draws"] == 50
    assert card["topk"]["captured_mass"] == pytest.approx(manifest.stats["captured_mass"]["mean"], abs=1e-6)


def test_fidelity_of_a_full_vocabulary_topk_is_perfect(tmp_path, teacher_dir, corpus):
    """Every id listed and stored in float32: nothing is lost. float16 storage costs a rounding the card sees."""
    cache = dump(teacher_dir, corpus, tmp_path / "full", top_k=64, limit=2, logprob_dtype="float32")
    card = Manifest.load(cache).stats["fidelity"]["topk"]
    assert card["kl_rest_bucket"] == 0 and card["tv_rest_bucket"] == 0
    assert card["captured_mass"] == pytest.approx(1.0, abs=1e-6)
    assert not math.isnan(card["kl_rest_bucket"])
    half = Manifest.load(dump(teacher_dir, corpus, tmp_path / "half", top_k=64, limit=2)).stats["fidelity"]["topk"]
    assert 0 < half["kl_rest_bucket"] < 1e-5


@pytest.mark.parametrize("flags, fragment", [(["--samples", 70000], "--samples must be between 1 and 65535"),
                                             (["--samples", 0], "--samples must be between 1 and 65535")])
def test_bad_sampling_flags_are_one_line_errors(tmp_path, teacher_dir, corpus, flags, fragment):
    from click.testing import CliRunner

    from kdcache.cli import main
    result = CliRunner().invoke(main, [str(arg) for arg in ["dump-teacher", "--teacher", teacher_dir, "--data", corpus,
                                                            "--out", tmp_path / "c", "--targets", "sampled", *flags]])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [f"Error: {fragment}, got {flags[1]}"]
    assert not (tmp_path / "c").exists()


def test_a_sampled_fidelity_card_measures_every_nth_position(both_cache, teacher_dir, corpus, tmp_path):
    """The default card measures a systematic sample (cheap); it estimates the full card and changes no content."""
    full = Manifest.load(both_cache)
    cache = dump(teacher_dir, corpus, tmp_path / "every4", targets="both", samples=50, batch_size=5, shard_rows=5,
                 fidelity_every=4)
    manifest = Manifest.load(cache)
    card, full_card = manifest.stats["fidelity"], full.stats["fidelity"]
    batches = sum(-(-shard.rows // 5) for shard in manifest.shards)
    assert card["every"] == 4 and manifest.total_tokens / 4 <= card["positions"] <= manifest.total_tokens / 4 + batches
    for kind, name in (("topk", "captured_mass"), ("sampled", "captured_mass"), ("topk", "kl_rest_bucket")):
        assert card[kind][name] == pytest.approx(full_card[kind][name], rel=0.25), (kind, name)
    assert manifest.dump_fingerprint == full.dump_fingerprint
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in full.shards]


def test_a_causal_lm_cache_is_head_4_and_proportional_tail_draws_by_default_and_trains_that_loss(
        tmp_path, teacher_dir, corpus, student_config):
    """No target flag on either side: dump-teacher writes the default of docs/frontier.md and train-student picks
    the loss that matches it."""
    from transformers import AutoModelForCausalLM

    from kdcache import DistillationLoss
    from kdcache.student import TrainSettings, train_student
    cache = tmp_path / "default"
    dump_teacher(str(teacher_dir), str(corpus), cache, DumpSettings(limit=6), progress=False)
    manifest = Manifest.load(cache)
    assert manifest.target_types == ("head-tail",) and manifest.top_k == 4
    assert (manifest.settings["samples"], manifest.settings["sampling"]) == (32, "proportional")
    assert manifest.columns["codec"]["ids"] == "gap-planes" and manifest.format_version == 3
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(teacher_dir).config)
    assert DistillationLoss(TrainSettings(), open_cache(cache), model).targets == "head-tail"
    summary = train_student(cache, tmp_path / "student", student_config=str(student_config),
                            settings=TrainSettings(max_steps=2, batch_size=3), progress=False)
    assert summary["steps"] == 2 and summary["final"]["kd"] > 0
