"""The compact codec (format 2): exact round trips, the 8-bit bound carried into the loss, head + sampled
tail unbiasedness, readability by pyarrow/datasets, the committed format-1 fixture, and refusal of bad bytes."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import skewed_topk_cache

from kdcache.cache.codecs import LOGPROB_STEP, Codec, Limits, Ragged, decode_targets
from kdcache.cache.format import FORMAT_VERSION, Manifest, shard_schema
from kdcache import RecodeSettings, open_cache, recode_cache
from kdcache.cache.writer import CachedSequence, to_record_batch
from kdcache.errors import KDCacheError
from kdcache.losses import SparseTargets, kd_loss
from kdcache.student import TrainSettings, train_student
from kdcache.student.batching import collate
from kdcache.teacher import DumpSettings, dump_teacher
from kdcache.teacher.targets import TopKTargets, sampled_targets, sampling_uniforms, select_head, tail_draws

FIXTURE = Path(__file__).parent / "fixtures"


def random_rows(vocab: int, k: int, lengths: list[int], draws: int, seed: int = 0) -> list[CachedSequence]:
    """Rows of decoded targets as a dump makes them: k distinct ids per position with their log-probs
    (normalised with the tail), and distinct ascending sampled ids with counts summing to `draws`."""
    rng = np.random.default_rng(seed)
    rows = []
    for sample_id, length in enumerate(lengths):
        logits = rng.normal(size=(length, min(vocab, 4096))) * 3
        ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(length)]) if length else \
            np.zeros((0, k), np.int64)
        logprobs = (logits[:, :k] - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
        tail = np.log1p(-np.minimum(np.exp(logprobs).sum(1), 1 - 1e-6)).astype(np.float32)
        if k == vocab:
            tail[:] = -np.inf
        sampled_ids, counts = [], []
        for _ in range(length):
            drawn = rng.choice(vocab, size=draws, replace=True)
            unique, count = np.unique(drawn, return_counts=True)
            sampled_ids.append(unique)
            counts.append(count)
        sizes = np.array([len(u) for u in sampled_ids], dtype=np.int64)
        rows.append(CachedSequence(
            sample_id=sample_id, input_ids=rng.integers(0, vocab, length).astype(np.int32),
            topk_ids=ids, topk_logprobs=logprobs, tail_logprob=tail,
            sampled_ids=Ragged.from_lengths(np.concatenate(sampled_ids) if length else np.zeros(0, np.int64), sizes),
            sampled_counts=Ragged.from_lengths(np.concatenate(counts) if length else np.zeros(0, np.int64), sizes)))
    return rows


def round_trip(rows, vocab: int, k: int, draws: int, codec: Codec) -> list[dict]:
    schema = shard_schema(top_k=k, vocab_size=vocab, logprob_dtype="float32", hidden_sizes={}, dump_fingerprint="x",
                          target_types=("topk", "sampled"), codec=codec, draws=draws)
    batch = to_record_batch(rows, schema, codec)
    columns, ragged = decode_targets(batch, codec, Limits(vocab, k, draws), "test")
    decoded = []
    for index in range(len(rows)):
        row = {}
        for name, (offsets, values) in columns.items():
            row[name] = values[offsets[index]:offsets[index + 1]]
        for name, (offsets, values) in ragged.items():
            row[name] = values.positions(slice(offsets[index], offsets[index + 1]))
        decoded.append(row)
    return decoded


def dense(ids: np.ndarray, logprobs: np.ndarray, vocab: int) -> np.ndarray:
    """[L, V] probabilities listed by (ids, logprobs); empty slots (-inf) add nothing."""
    out = np.zeros((len(ids), vocab))
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    np.add.at(out, (rows, ids.reshape(-1).astype(np.int64)), np.exp(logprobs.reshape(-1).astype(np.float64)))
    return out


@pytest.mark.parametrize("vocab, k", [(300, 1), (300, 300), (70_000, 8), (70_000, 1)])
@pytest.mark.parametrize("logprobs, id_planes, ranked", [("float32", False, False), ("float16", False, False),
                                                         ("uint8", False, False), ("uint8", True, False),
                                                         ("uint8", True, True), ("float32", False, True)])
def test_compact_round_trip(vocab, k, logprobs, id_planes, ranked):
    """Ids, tail, sampled ids and counts come back exactly (with or without id planes and an id ranking, below
    and above 65,536 ids); log-probs within the stated error of their type."""
    lengths = [0, 1, 7, 0, 3]  # empty and one-token rows among others
    rows = random_rows(vocab, k, lengths, draws=20)
    # a ranking listing some ids that occur and some that do not, in no particular order
    ranking = tuple(int(i) for i in np.random.default_rng(1).choice(vocab, size=min(vocab, 200), replace=False))
    codec = Codec(layout="compact", logprobs=logprobs, id_planes=id_planes, id_ranking=ranking if ranked else ())
    bound = {"float32": 0.0, "float16": 2.0**-11, "uint8": LOGPROB_STEP / 2}[logprobs]
    for row, back in zip(rows, round_trip(rows, vocab, k, 20, codec)):
        listed = back["topk_logprobs"] > -np.inf
        assert listed.sum() == row.topk_ids.size
        want = dense(row.topk_ids, row.topk_logprobs, vocab)
        got = dense(back["topk_ids"], back["topk_logprobs"], vocab)
        assert np.array_equal(want > 0, got > 0), "the same ids at every position"
        if logprobs == "uint8":  # codes cover [-255/16, 0]: below it a log-prob decodes to the floor
            clipped = np.maximum(row.topk_logprobs, -255 * LOGPROB_STEP)
            want = dense(row.topk_ids, clipped, vocab)
        nonzero = want > 0
        error = np.abs(np.log(got[nonzero]) - np.log(want[nonzero]))
        assert error.max(initial=0) <= bound * max(1, np.abs(np.log(want[nonzero])).max(initial=0)) + 1e-6
        np.testing.assert_array_equal(back["tail_logprob"], row.tail_logprob)
        np.testing.assert_array_equal(back["sampled_ids"].values, row.sampled_ids.values)
        np.testing.assert_array_equal(back["sampled_ids"].offsets, row.sampled_ids.offsets)
        np.testing.assert_array_equal(back["sampled_counts"].values, row.sampled_counts.values)


def test_ids_above_65535_are_uint32_and_counts_uint8():
    schema = shard_schema(top_k=4, vocab_size=70_000, logprob_dtype="float32", hidden_sizes={}, dump_fingerprint="x",
                          target_types=("head-tail",), codec=Codec(layout="compact", logprobs="uint8"), draws=200)
    assert schema.field("topk_ids").type == pa.list_(pa.uint32())
    assert schema.field("sampled_counts").type == pa.list_(pa.uint8())
    assert schema.field("topk_logprobs").type == pa.list_(pa.uint8())
    assert schema.metadata[b"kdcache.format_version"] == b"2"
    planes = shard_schema(top_k=4, vocab_size=70_000, logprob_dtype="float32", hidden_sizes={}, dump_fingerprint="x",
                          target_types=("head-tail",), codec=Codec(layout="compact", logprobs="uint8", id_planes=True),
                          draws=200)
    assert planes.field("sampled_ids").type == pa.list_(pa.uint8())
    assert planes.field("sampled_ids_high").type == pa.list_(pa.uint16())  # 69,999 >> 8 = 273
    assert planes.metadata[b"kdcache.format_version"] == b"3"


def test_loss_on_a_decoded_cache_is_within_the_quantisation_bound():
    """Each stored log-prob is off by at most δ = step/2, so the renormalised (k+1)-categorical moves by at
    most 2δ in log space, and forward KL moves by at most 2δ + (e^{2δ} - 1)·max|log p - log q|."""
    vocab, k = 500, 16
    rows = random_rows(vocab, k, [40, 25], draws=10, seed=3)
    decoded = round_trip(rows, vocab, k, 10, Codec(layout="compact", logprobs="uint8"))
    exact = round_trip(rows, vocab, k, 10, Codec(layout="compact", logprobs="float32"))
    student = torch.randn(65, vocab, dtype=torch.float64) * 2

    def targets(parts):
        return SparseTargets(ids=torch.from_numpy(np.concatenate([p["topk_ids"] for p in parts])),
                             logprobs=torch.from_numpy(np.concatenate([p["topk_logprobs"] for p in parts])).double(),
                             tail_logprob=torch.from_numpy(np.concatenate([p["tail_logprob"] for p in parts])).double())
    reference = torch.from_numpy(np.concatenate([r.topk_logprobs for r in rows])).double()
    float_targets = targets(exact)
    assert torch.equal(float_targets.logprobs.sort(-1).values, reference.sort(-1).values)
    loss_exact = kd_loss(student, float_targets)
    loss_coded = kd_loss(student, targets(decoded))
    delta = 2 * (LOGPROB_STEP / 2)
    log_q = torch.log_softmax(student, -1)
    spread = float((reference - log_q.gather(1, float_targets.ids)).abs().max()) + delta + 20
    assert 0 < abs(float(loss_coded - loss_exact)) <= delta + math.expm1(delta) * spread


def head_of(logprobs: torch.Tensor, k: int) -> TopKTargets:
    """The top-k of [N, V] log-probs with the exact log-mass of the rest."""
    values, ids = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(1, ids, float("-inf")), -1)
    return TopKTargets(ids=ids, logprobs=values, tail_logprob=tail, next_logprob=torch.zeros(len(ids)))


def test_mass_adaptive_head_keeps_the_fewest_ids_and_an_exact_tail():
    torch.manual_seed(0)
    logits = torch.randn(50, 200) * torch.linspace(0.2, 6, 50)[:, None]  # flat to peaked positions
    head = select_head(head_of(torch.log_softmax(logits, -1), 64), top_k=64, top_p=0.9)
    listed = head.logprobs > float("-inf")
    mass = head.logprobs.double().exp().nan_to_num(0).sum(-1)
    kept = listed.sum(-1)
    assert kept.min() >= 1 and kept.max() <= 64 and kept[0] > kept[-1], "flat positions keep more ids"
    reached = mass >= 0.9 - 1e-6
    assert (reached | (kept == 64)).all(), "the mass reaches top_p unless max k stops it"
    without_last = mass - head.logprobs.double().exp().masked_fill(~listed, 1.0).min(-1).values
    assert (without_last < 0.9 + 1e-6).all(), "one id fewer would not reach it"
    np.testing.assert_allclose((mass + head.tail_logprob.double().exp()).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("sampling", ["independent", "systematic", "proportional"])
def test_head_plus_sampled_tail_is_unbiased(sampling):
    """E[head as stored + r · count / n on the tail draws] = p, over seeds, n = the position's draws (N, or
    ceil(N · r) in proportion to the tail mass); the head ids are never drawn."""
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 2
    p = torch.softmax(logits.double(), -1)
    lp = torch.log_softmax(logits, -1)
    head = head_of(lp, 4)
    ids, values, tail = head.ids, head.logprobs, head.tail_logprob
    per_position = tail_draws(tail, 8) if sampling == "proportional" else None
    if per_position is not None:
        assert per_position.tolist() == [math.ceil(8 * r) for r in tail.double().exp().tolist()]
        assert per_position.min() < 8, "the test would not tell proportional draws from N at every position"
    total, seeds = torch.zeros_like(p), 400
    for seed in range(seeds):
        drawn = sampled_targets(logits, sampling_uniforms([7], [3], 8, seed), vocab_size=40, exclude=head,
                                systematic=sampling != "independent", draws_per_row=per_position)
        rows = torch.repeat_interleave(torch.arange(3), drawn.offsets.diff())
        assert not (drawn.ids[:, None] == ids[rows]).any()
        draws = torch.zeros(3, dtype=torch.long).index_add_(0, rows, drawn.counts)
        assert draws.tolist() == ([8, 8, 8] if per_position is None else per_position.tolist())
        estimate = torch.zeros_like(p).scatter(1, ids, values.double().exp())
        estimate.index_put_((rows, drawn.ids), drawn.counts.double() / draws[rows] * tail.double().exp()[rows],
                            accumulate=True)
        total += estimate
    assert torch.allclose(total / seeds, p, atol=0.01)
    none = sampled_targets(logits, sampling_uniforms([7], [3], 8, 0), vocab_size=40, exclude=head_of(lp, 40))
    assert none.ids.numel() == 0 and (none.offsets == 0).all(), "k = V leaves nothing to draw"


@pytest.fixture(scope="module")
def head_tail_cache(tmp_path_factory, teacher_dir, corpus):
    out = tmp_path_factory.mktemp("codec") / "head-tail"
    dump_teacher(str(teacher_dir), str(corpus), out,
                 DumpSettings(targets="head-tail", top_k=4, samples=16, sampling="systematic", codec="compact",
                              logprob_dtype="uint8", compression="zstd", limit=12, batch_size=5, shard_rows=6,
                              fidelity_every=1),
                 progress=False)
    return out


def test_compact_cache_is_format_3_and_readable_by_pyarrow_and_datasets(head_tail_cache):
    """What pyarrow and `datasets` read is the spec's columns: the sampled ids' gaps as a low byte plane and a high
    one, ids = running sums of low + 256 · high within each position."""
    manifest = Manifest.load(head_tail_cache)
    open_cache(head_tail_cache).verify(progress=False)
    assert manifest.format_version == 3 and manifest.codec.compression == "zstd" and manifest.codec.id_planes
    table = pa.ipc.open_file(str(head_tail_cache / manifest.shards[0].file)).read_all()
    assert table.schema.field("sampled_counts").type == pa.list_(pa.uint8())
    assert table.schema.field("sampled_ids").type == table.schema.field("sampled_ids_high").type == pa.list_(pa.uint8())
    rows = datasets.load_dataset("arrow", data_files=[str(head_tail_cache / s.file) for s in manifest.shards],
                                 split="train")
    sequences = {s.sample_id: s for s in open_cache(head_tail_cache).sequences()}
    assert len(rows) == 12
    for row in rows:
        sequence = sequences[row["sample_id"]]
        assert row["input_ids"] == sequence.input_ids.tolist()
        assert sum(row["topk_lengths"]) == len(row["topk_ids"]) == int((sequence.topk_logprobs > -np.inf).sum())
        assert sum(row["sampled_counts"]) == 16 * len(row["input_ids"])
        gaps = np.array(row["sampled_ids"]) + 256 * np.array(row["sampled_ids_high"])
        starts = np.cumsum(row["sampled_lengths"]) - row["sampled_lengths"]
        ids = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[starts] - gaps[starts], row["sampled_lengths"])
        assert ids.tolist() == sequence.sampled_ids.values.tolist()
    card = manifest.stats["fidelity"]["head-tail"]
    assert card["top_k"] == 4 and card["draws"] == 16 and 4 < card["distinct_ids"] <= 20


def test_draws_in_proportion_to_the_tail_mass_make_a_valid_cache_of_fewer_draws(tmp_path, teacher_dir, corpus,
                                                                                 head_tail_cache):
    """`sampling` proportional (head-tail's default): ceil(N · r) draws at each position, read back and verified,
    and an estimate that still sums to one in expectation (head + r · c / n) where the batch decodes it."""
    out = tmp_path / "proportional"
    dump_teacher(str(teacher_dir), str(corpus), out,
                 DumpSettings(targets="head-tail", top_k=4, samples=16, limit=12,
                              batch_size=5, shard_rows=6, fidelity_every=1), progress=False)
    open_cache(out).verify(progress=False)
    assert Manifest.load(out).dump_fingerprint != Manifest.load(head_tail_cache).dump_fingerprint
    fewer = 0
    for sequence in open_cache(out).sequences():
        draws = np.add.reduceat(sequence.sampled_counts.values, sequence.sampled_counts.offsets[:-1])
        expected = np.clip(np.ceil(16 * np.exp(sequence.tail_logprob.astype(np.float64))), 1, 16)
        np.testing.assert_array_equal(draws, expected)
        fewer += int((draws < 16).sum())
    assert fewer > 0
    estimate = collate(list(open_cache(out).sequences())).sparse_targets("head-tail").logprobs.double().exp().sum(-1)
    np.testing.assert_allclose(estimate.numpy(), 1.0, atol=0.05)


def test_draws_from_the_tail_may_be_fewer_than_n_but_never_more():
    rows = random_rows(6, 4, [5, 3], draws=10)  # at most 6 distinct ids of 10 draws
    tail_codec = Codec(layout="compact", logprobs="uint8", draws_from="tail")
    schema = shard_schema(top_k=4, vocab_size=6, logprob_dtype="float32", hidden_sizes={}, dump_fingerprint="x",
                          target_types=("head-tail",), codec=tail_codec, draws=10)
    batch = to_record_batch(rows, schema, tail_codec)
    decode_targets(batch, tail_codec, Limits(6, 4, 12), "fewer")  # 10 draws where 12 are allowed
    with pytest.raises(KDCacheError, match="do not add up to 12 draws"):
        decode_targets(batch, Codec(layout="compact", logprobs="uint8"), Limits(6, 4, 12), "whole distribution")
    with pytest.raises(KDCacheError, match="do not add up to at most 8 draws"):
        decode_targets(batch, tail_codec, Limits(6, 4, 8), "more")


def test_an_older_reader_refuses_a_newer_format(head_tail_cache):
    text = (head_tail_cache / "kdcache.json").read_text()
    newer = json.loads(text) | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(KDCacheError, match="newer than this kdcache supports"):
        Manifest.from_json(json.dumps(newer), "kdcache.json")


def test_training_picks_the_head_tail_loss_from_the_cache(head_tail_cache, student_config, tmp_path):
    """No `targets` flag: the head-tail estimate (forward KL on head + r·c/N) is what train-student optimises."""
    summary = train_student(head_tail_cache, tmp_path / "student", student_config=str(student_config),
                            settings=TrainSettings(max_steps=2, batch_size=4), progress=False)
    assert summary["steps"] == 2 and summary["final"]["kd"] > 0
    batch = collate(list(open_cache(head_tail_cache).sequences()))
    targets = batch.sparse_targets("head-tail")
    assert targets.tail_logprob is None
    np.testing.assert_allclose(targets.logprobs.double().exp().sum(-1).numpy(), 1.0, atol=0.05)


HEAD_TAIL_CODEC = Codec(layout="compact", logprobs="uint8", compression="zstd", draws_from="tail")


@pytest.mark.parametrize("version, codec, ranked", [
    (1, Codec(logprobs="float16"), 0),
    (2, HEAD_TAIL_CODEC, 0),
    (3, dataclasses.replace(HEAD_TAIL_CODEC, id_planes=True), 0),
    (4, dataclasses.replace(HEAD_TAIL_CODEC, id_planes=True), 567)])
def test_committed_fixtures_read_as_they_were_written(version, codec, ranked):
    """A cache of every format this kdcache has written (committed, made by the kdcache of its time) decodes to the
    values recorded when it was made: format 1 (plain top-k + sampled), 2 (compact head-tail), 3 (its sampled ids
    in byte planes, proportional draws), 4 (the format-3 cache recoded, its ids ranked). Top-k entries decode most
    probable first (ties by ascending id) in every format: the expectations of formats 2 to 4, recorded when
    compact caches decoded in ascending id order, were reordered so, values unchanged."""
    cache = FIXTURE / f"v{version}_cache"
    manifest = Manifest.load(cache)
    assert manifest.format_version == version and len(manifest.codec.id_ranking) == ranked
    assert dataclasses.replace(manifest.codec, id_ranking=()) == codec
    open_cache(cache).verify(progress=False)
    expected = json.loads((FIXTURE / f"v{version}_cache_expected.json").read_text())
    sequences = list(open_cache(cache).sequences())
    assert sorted(str(s.sample_id) for s in sequences) == sorted(expected)
    for sequence in sequences:
        want = expected[str(sequence.sample_id)]
        assert sequence.input_ids.tolist() == want["input_ids"] and sequence.topk_ids.tolist() == want["topk_ids"]
        assert (np.diff(sequence.topk_logprobs, axis=1) <= 0).all()  # most probable first, whatever the codec
        np.testing.assert_array_equal(sequence.topk_logprobs.astype(float), want["topk_logprobs"])
        np.testing.assert_array_equal(sequence.tail_logprob.astype(float), want["tail_logprob"])
        assert sequence.sampled_ids.values.tolist() == want["sampled_ids"]
        assert sequence.sampled_counts.values.tolist() == want["sampled_counts"]
        assert sequence.sampled_ids.lengths().tolist() == want.get("sampled_lengths", sequence.sampled_ids.lengths().tolist())


def tampered(rows, vocab, k, draws, column, change):
    codec = Codec(layout="compact", logprobs="uint8")
    schema = shard_schema(top_k=k, vocab_size=vocab, logprob_dtype="float32", hidden_sizes={}, dump_fingerprint="x",
                          target_types=("topk", "sampled"), codec=codec, draws=draws)
    batch = to_record_batch(rows, schema, codec)
    index = schema.get_field_index(column)
    array = batch.column(index)
    values = array.flatten().to_numpy(zero_copy_only=False).copy()
    change(values)
    replaced = pa.ListArray.from_arrays(array.offsets, pa.array(values, type=array.type.value_type))
    return decode_targets(batch.set_column(index, schema.field(index), replaced), codec, Limits(vocab, k, draws), "bad")


@pytest.mark.parametrize("column, change, message", [
    ("topk_ids", lambda v: v.__setitem__(0, 299), "outside the vocabulary"),
    ("topk_ids", lambda v: v.__setitem__(1, 0), "not strictly ascending"),
    ("topk_lengths", lambda v: v.__setitem__(0, 9), "manifest allows 4"),
    ("sampled_counts", lambda v: v.__setitem__(0, v[0] + 1), "do not add up"),
])
def test_bad_bytes_are_refused(column, change, message):
    rows = random_rows(200, 4, [5, 3], draws=10)
    with pytest.raises(KDCacheError, match=message):
        tampered(rows, 200, 4, 10, column, change)


def test_recode_shrinks_k_and_quantises_without_the_teacher(cache_dir, tmp_path):
    """top-8 float16 → top-4 8-bit compact zstd: the 4 most probable ids, their log-probs within the code
    step, the dropped mass added to the exact tail; verified, same rows, a fingerprint of its own."""
    from click.testing import CliRunner

    from kdcache.cli import main
    out = tmp_path / "recoded"
    result = CliRunner().invoke(main, ["recode", str(cache_dir), "--out", str(out), "--top-k", "4", "--no-rank-ids"])
    assert result.exit_code == 0, result.output
    source, recoded = Manifest.load(cache_dir), Manifest.load(out)
    open_cache(out).verify(progress=False)
    assert recoded.format_version == 2 and recoded.top_k == 4 and recoded.hidden_layers == source.hidden_layers
    assert recoded.dump_fingerprint != source.dump_fingerprint
    assert recoded.stats["content_sha256"] == source.stats["content_sha256"]
    assert recoded.total_bytes < source.total_bytes  # the hidden states (kept as they are) dominate here
    before = {s.sample_id: s for s in open_cache(cache_dir).sequences(hidden_layers=source.hidden_layers)}
    for after in open_cache(out).sequences(hidden_layers=recoded.hidden_layers):
        original = before[after.sample_id]
        order = np.argsort(-original.topk_logprobs.astype(np.float32), axis=1, kind="stable")[:, :4]
        kept_ids = np.take_along_axis(original.topk_ids.astype(np.int64), order, 1)
        kept = np.take_along_axis(original.topk_logprobs.astype(np.float32), order, 1)
        assert (np.diff(after.topk_logprobs, axis=1) <= 0).all()  # most probable first, as the source
        after_by_id = np.argsort(after.topk_ids, 1)
        np.testing.assert_array_equal(np.take_along_axis(after.topk_ids, after_by_id, 1), np.sort(kept_ids, 1))
        by_id = np.take_along_axis(kept, np.argsort(kept_ids, 1), 1)
        assert np.abs(np.take_along_axis(after.topk_logprobs, after_by_id, 1)
                      - np.maximum(by_id, -255 * LOGPROB_STEP)).max() <= LOGPROB_STEP / 2 + 1e-6
        dropped = np.logaddexp.reduce(np.sort(original.topk_logprobs.astype(np.float64), 1)[:, :4], axis=1)
        np.testing.assert_allclose(after.tail_logprob, np.logaddexp(original.tail_logprob, dropped), rtol=1e-5)
        layer = source.hidden_layers[0]
        np.testing.assert_array_equal(after.hidden[layer], original.hidden[layer])


def same_rows(cache: Path, other: Path) -> None:
    for original, back in zip(open_cache(cache).sequences(), open_cache(other).sequences(), strict=True):
        for name in ("sample_id", "input_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(back, name), getattr(original, name))
        for name in ("sampled_ids", "sampled_counts"):
            if getattr(original, name) is not None:
                np.testing.assert_array_equal(getattr(back, name).values, getattr(original, name).values)
                np.testing.assert_array_equal(getattr(back, name).offsets, getattr(original, name).offsets)


def test_recode_ranks_the_ids_where_that_makes_the_cache_smaller(head_tail_cache, tmp_path):
    """Recoding ranks the ids by how often the cache lists them (format 4) when that makes the cache smaller: the
    decoded rows are the source's, value for value and in the same order. Where it would not (a random teacher's
    systematic draws are evenly spaced in id order), the cache stays format 3, like `--no-rank-ids`."""
    source = skewed_topk_cache(tmp_path / "skewed", seed=0)
    ranked = recode_cache(source, tmp_path / "ranked", RecodeSettings(), progress=False)
    unranked = recode_cache(source, tmp_path / "unranked", RecodeSettings(rank_ids=False), progress=False)
    assert (ranked.format_version, unranked.format_version) == (4, 2) and unranked.codec.id_ranking == ()
    assert ranked.total_bytes < 0.9 * unranked.total_bytes
    listed = collections.Counter()
    for row in open_cache(source).sequences():
        listed.update(row.topk_ids[row.topk_logprobs > -np.inf].tolist())
    assert list(ranked.codec.id_ranking) == sorted(listed, key=lambda token: (-listed[token], token))
    same_rows(tmp_path / "unranked", tmp_path / "ranked")  # (the source lists each head in descending order)
    flat = recode_cache(head_tail_cache, tmp_path / "flat", RecodeSettings(), progress=False)
    assert flat.format_version == 3 and flat.codec.id_ranking == ()
    same_rows(head_tail_cache, tmp_path / "flat")


def test_a_bad_id_ranking_is_refused_in_one_line(tmp_path):
    """A ranking that repeats an id or names one outside the vocabulary is refused when the manifest is read; a
    valid ranking other than the one the shards were written with, when the shards are read (their metadata
    holds its hash), never decoded into other ids."""
    from click.testing import CliRunner

    from kdcache.cli import main
    ranked = recode_cache(skewed_topk_cache(tmp_path / "skewed", seed=0), tmp_path / "ranked", RecodeSettings(), progress=False)
    manifest = json.loads((tmp_path / "ranked" / "kdcache.json").read_text())
    for ranking, message in (([0, 0], "at most 4096 distinct ids"), ([ranked.vocab_size], "outside the")):
        manifest["columns"]["codec"]["id_ranking"] = ranking
        (tmp_path / "ranked" / "kdcache.json").write_text(json.dumps(manifest))
        result = CliRunner().invoke(main, ["info", str(tmp_path / "ranked")])
        assert result.exit_code != 0 and message in result.output and len(result.output.strip().splitlines()) == 1
    manifest["columns"]["codec"]["id_ranking"] = [*ranked.codec.id_ranking[1::-1], *ranked.codec.id_ranking[2:]]
    (tmp_path / "ranked" / "kdcache.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "ranked")])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(errors) == 1 and errors[0].endswith("does not match the manifest")


def test_recode_refuses_what_needs_the_teacher(cache_dir, head_tail_cache, tmp_path):
    from kdcache.teacher.recode import RecodeSettings, recode_cache
    with pytest.raises(KDCacheError, match="sampled draws cannot be made from a topk cache"):
        recode_cache(cache_dir, tmp_path / "a", RecodeSettings(targets="sampled"), progress=False)
    with pytest.raises(KDCacheError, match="more than the source's 8"):
        recode_cache(cache_dir, tmp_path / "b", RecodeSettings(top_k=9), progress=False)
    with pytest.raises(KDCacheError, match="a head cannot grow"):
        recode_cache(head_tail_cache, tmp_path / "c", RecodeSettings(top_k=2), progress=False)
    head_only = recode_cache(head_tail_cache, tmp_path / "d", RecodeSettings(targets="topk"), progress=False)
    assert head_only.target_types == ("topk",) and head_only.draws is None


def test_recoded_draws_keep_the_way_they_were_made(head_tail_cache, tmp_path):
    """A recode copies the draws, so it records their `sampling`: the source's, or independent for a cache from
    before the setting (the format-1 fixture)."""
    from kdcache.teacher.recode import RecodeSettings, recode_cache
    assert "sampling" not in Manifest.load(FIXTURE / "v1_cache").settings
    old = recode_cache(FIXTURE / "v1_cache", tmp_path / "old", RecodeSettings(), progress=False)
    new = recode_cache(head_tail_cache, tmp_path / "new", RecodeSettings(compression="none"), progress=False)
    assert old.settings["sampling"] == "independent" and new.settings["sampling"] == "systematic"


def test_the_card_of_a_head_tail_cache_says_what_it_holds(head_tail_cache):
    card = (head_tail_cache / "README.md").read_text()
    assert "the exact top-4 head (uint8 log-probabilities)" in card
    assert "(16 per position, systematic draws at temperature 1, seed 0)" in card
    figures = Manifest.load(head_tail_cache).stats["fidelity"]["head-tail"]
    assert (f"| head 4 + 16 tail draws ({figures['distinct_ids']:.1f} distinct ids) | {figures['captured_mass']:.4f} | "
            f"{figures['kl_on_support']:.4f} (the estimate, on the stored ids) |") in card


def test_info_card_report_and_copies_describe_a_head_tail_cache_alike(head_tail_cache, tmp_path):
    """The default cache's fidelity card shows in `info` and the card alike; a row subset keeps the codec and
    compression, and states the source's card and teacher NLL (they cannot be split by row), not "None"."""
    from click.testing import CliRunner

    from kdcache.cli import main
    from kdcache.plots import cache_report_data
    info = CliRunner().invoke(main, ["info", str(head_tail_cache)])
    assert info.exit_code == 0, info.output
    assert "fidelity     head 4 + 16 tail draws" in info.output
    assert "head 4 + 16 tail draws" in (head_tail_cache / "README.md").read_text()
    assert cache_report_data(head_tail_cache)["captured_mass_by_position"] is not None  # its exact tail is plotted
    source = Manifest.load(head_tail_cache)
    result = CliRunner().invoke(main, ["copy", str(head_tail_cache), str(tmp_path / "subset"), "--rows", "3"])
    assert result.exit_code == 0, result.output
    subset = Manifest.load(tmp_path / "subset")
    assert subset.codec == source.codec and subset.total_rows == 3
    for shard in subset.shards:  # compressed as the source is: smaller than the same table written plainly
        table = pa.ipc.open_file(tmp_path / "subset" / shard.file).read_all()
        plain = pa.BufferOutputStream()
        with pa.ipc.new_file(plain, table.schema) as writer:
            writer.write_table(table)
        assert shard.bytes < plain.getvalue().size
    assert subset.stats["teacher_nll"] == source.stats["teacher_nll"] and "captured_mass" in subset.stats
    info = CliRunner().invoke(main, ["info", str(tmp_path / "subset")])
    assert "(of the source cache)" in info.output and "of the source cache (a subset" in info.output
    assert "not recorded" not in info.output and "None" not in info.output
    open_cache(tmp_path / "subset").verify(progress=False)
