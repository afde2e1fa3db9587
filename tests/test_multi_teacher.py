"""Several teachers: the mixture of their targets against dense float64 references, and multi-teacher caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LANGUAGE, tiny_llama_config, write_jsonl
from hostile import map_values, rehash, rewrite_shard
from transformers import AutoModelForCausalLM, TrainingArguments

from kdcache import DumpSettings, TrainSettings, dump_teacher, open_cache
from kdcache.cache.card import CARD_NAME
from kdcache.cache.format import MANIFEST_NAME, Manifest, sha256_file
from kdcache.cache.teachers import join_teachers
from kdcache.cache.transfer import copy_cache
from kdcache.cli import main
from kdcache.demo.synthetic import build_word_tokenizer
from kdcache.errors import KDCacheError
from kdcache.losses import SparseTargets, dense_kd_loss, kd_loss, mix_targets

V, N = 12, 6
WEIGHTS = [0.6, 0.4]


def _teachers(seed: int) -> list[torch.Tensor]:
    """Two teachers' full distributions (float64 log-probs [N, V]), peaked differently."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(torch.randn(N, V, generator=generator, dtype=torch.float64) * scale, -1)
            for scale in (2.0, 1.0)]


def _topk(logprobs: torch.Tensor, k: int) -> SparseTargets:
    """Top-k targets with the exact tail, as a cache stores them."""
    values, ids = logprobs.topk(k, -1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), -1)
    return SparseTargets(ids=ids, logprobs=values, tail_logprob=tail)


def _dense(targets: SparseTargets) -> torch.Tensor:
    """The probabilities a tail-less target lists, as a dense [N, V] float64 tensor (duplicates summed)."""
    listed = targets.logprobs > float("-inf")
    return torch.zeros(N, V, dtype=torch.float64).scatter_add_(
        -1, targets.ids, torch.where(listed, targets.logprobs.exp(), 0.0))


def _student(seed: int) -> torch.Tensor:
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


def _gradient(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


def test_topk_mixture_is_the_mixture_of_each_teachers_rest_bucket_completion():
    """Dense reference: each teacher's full distribution cut to its top-k, its exact tail mass spread over its
    unlisted ids like the student's (the rest bucket's completion), mixed; forward KL value and gradient."""
    teachers, logits = _teachers(0), _student(1)
    targets = [_topk(teachers[0], 3), _topk(teachers[1], 5)]
    mixed = mix_targets(targets, WEIGHTS, logits)
    q = torch.softmax(logits.detach(), -1)
    completed = torch.zeros(N, V, dtype=torch.float64)
    for weight, target in zip(WEIGHTS, targets):
        own = torch.zeros(N, V, dtype=torch.bool).scatter_(-1, target.ids, True)
        spread = target.tail_logprob.exp()[:, None] * q / q.masked_fill(own, 0).sum(-1, keepdim=True)
        completed += weight * torch.where(own, torch.zeros(N, V, dtype=torch.float64).scatter(
            -1, target.ids, target.logprobs.exp()), spread)
    assert torch.allclose(completed.sum(-1), torch.ones(N, dtype=torch.float64))
    loss = kd_loss(logits, mixed)
    reference = (completed * (completed.log() - torch.log_softmax(logits, -1))).sum(-1).mean()
    assert torch.allclose(loss, reference, atol=1e-12)
    gradient = _gradient(loss, logits)
    assert torch.allclose(gradient, (q - completed) / N, atol=1e-12)
    # the same gradient as the teachers' own rest-bucket losses, weighted
    separate = sum(weight * kd_loss(logits, target) for weight, target in zip(WEIGHTS, targets))
    assert torch.allclose(gradient, _gradient(separate, logits), atol=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_topk_mixture_of_complete_teachers_is_exact_for_every_divergence(divergence):
    """Where the caches list every id, the mixture is the ensemble itself: equal to the dense divergence to the
    float64 mixture of the full distributions, value and gradient."""
    teachers, logits = _teachers(2), _student(3)
    mixed = mix_targets([_topk(teacher, V) for teacher in teachers], WEIGHTS, logits)
    ensemble = torch.log(WEIGHTS[0] * teachers[0].exp() + WEIGHTS[1] * teachers[1].exp())
    loss, reference = kd_loss(logits, mixed, divergence=divergence), dense_kd_loss(logits, ensemble,
                                                                                    divergence=divergence)
    assert torch.allclose(loss, reference, atol=1e-10)
    assert torch.allclose(_gradient(loss, logits), _gradient(reference, logits), atol=1e-10)


def test_one_teacher_mixture_is_its_own_targets():
    teachers, logits = _teachers(4), _student(5)
    target = _topk(teachers[0], 4)
    loss = kd_loss(logits, mix_targets([target], [1.0], logits), divergence="jsd")
    assert torch.allclose(loss, kd_loss(logits, target, divergence="jsd"), atol=1e-12)


def _draws(logprobs: torch.Tensor, count: int, generator: np.random.Generator) -> SparseTargets:
    """`count` draws per position from a distribution, as sampled targets: distinct ids with log(count / n)."""
    probs = logprobs.exp().numpy()
    ids = np.zeros((N, count), dtype=np.int64)
    values = np.full((N, count), -np.inf)
    for row in range(N):
        drawn, counts = np.unique(generator.choice(V, size=count, p=probs[row] / probs[row].sum()),
                                  return_counts=True)
        ids[row, :len(drawn)], values[row, :len(drawn)] = drawn, np.log(counts / count)
    return SparseTargets(ids=torch.from_numpy(ids), logprobs=torch.from_numpy(values), tail_logprob=None)


def _head_tail(logprobs: torch.Tensor, k: int, count: int, generator: np.random.Generator) -> SparseTargets:
    """The head (top-k, exact) plus draws from the renormalised tail at r · c / n, as `Batch.sparse_targets`."""
    head = _topk(logprobs, k)
    rest = logprobs.scatter(-1, head.ids, float("-inf"))
    drawn = _draws(rest - torch.logsumexp(rest, -1, keepdim=True), count, generator)
    return SparseTargets(ids=torch.cat([head.ids, drawn.ids], -1),
                         logprobs=torch.cat([head.logprobs, head.tail_logprob[:, None] + drawn.logprobs], -1),
                         tail_logprob=None)


@pytest.mark.parametrize("kind", ["sampled", "head-tail"])
def test_drawn_mixture_is_unbiased(kind):
    """Each draw's mixture is exactly Σ w p̂_t (dense float64), forward KL's gradient is q minus it, and the mean
    over draws converges to the dense mixture of the full distributions."""
    teachers, logits = _teachers(6), _student(7)
    ensemble = WEIGHTS[0] * teachers[0].exp() + WEIGHTS[1] * teachers[1].exp()
    generator = np.random.default_rng(0)
    make = ((lambda teacher: _draws(teacher, 16, generator)) if kind == "sampled"
            else (lambda teacher: _head_tail(teacher, 3, 8, generator)))
    total, trials = torch.zeros(N, V, dtype=torch.float64), 600
    for trial in range(trials):
        estimates = [make(teacher) for teacher in teachers]
        mixed = mix_targets(estimates, WEIGHTS, logits)
        dense = _dense(mixed)
        assert torch.allclose(dense, WEIGHTS[0] * _dense(estimates[0]) + WEIGHTS[1] * _dense(estimates[1]),
                              atol=1e-12)
        if trial == 0:
            gradient = _gradient(kd_loss(logits, mixed), logits)
            assert torch.allclose(gradient, (torch.softmax(logits.detach(), -1) - dense) / N, atol=1e-12)
        total += dense
    assert (total / trials - ensemble).abs().max() < 0.03


def test_mixing_refuses_top_k_with_sampled():
    teachers, logits = _teachers(8), _student(9)
    with pytest.raises(ValueError, match="cannot mix top-k"):
        mix_targets([_topk(teachers[0], 3), _draws(teachers[1], 4, np.random.default_rng(0))], WEIGHTS, logits)


# --------------------------------------------------------------------------- multi-teacher caches


def _run(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _error(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("Error:")][-1]


def _teacher(directory: Path, tokenizer, seed: int, hidden: int) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=hidden)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SETTINGS = {"batch_size": 8, "shard_rows": 8}


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, tokenizer):
    """The same 20 rows dumped by two random teachers of different widths (top-4 and head-tail compact caches),
    joined as a and b."""
    root = tmp_path_factory.mktemp("teachers")
    corpus = write_jsonl(root / "corpus.jsonl", LANGUAGE.sentences(20, min_words=4, max_words=12, seed=3))
    a = dump_teacher(str(_teacher(root / "ta", tokenizer, 0, 32)), str(corpus), root / "a",
                     DumpSettings(top_k=4, **SETTINGS), progress=False)
    b = dump_teacher(str(_teacher(root / "tb", tokenizer, 1, 16)), str(corpus), root / "b",
                     DumpSettings(top_k=6, **SETTINGS), progress=False)
    joined = _run("merge", root / "a", root / "b", "--teachers", "a,b", "--out", root / "joined")
    assert joined.exit_code == 0, joined.output
    return root, a, b, corpus


def test_joined_cache_holds_every_teacher_and_reads_them_along(two_teachers):
    root, a, b, _ = two_teachers
    manifest = Manifest.load(root / "joined")
    assert manifest.teacher_names == ["a", "b"]
    first, second = manifest.teachers
    assert (first["path"], second["path"]) == ("", "teachers/b")
    assert first["teacher"] == a.teacher and second["teacher"] == b.teacher
    assert (first["dump_fingerprint"], second["dump_fingerprint"]) == (a.dump_fingerprint, b.dump_fingerprint)
    assert second["fidelity"] == b.stats["fidelity"] and second["top_k"] == 6
    assert second["manifest_sha256"] == sha256_file(root / "joined" / "teachers" / "b" / MANIFEST_NAME)
    assert manifest.dump_fingerprint not in (a.dump_fingerprint, b.dump_fingerprint)
    # the cache's own teacher's shards are a's, byte for byte; b's cache is b's, byte for byte
    for shard in a.shards:
        assert (root / "joined" / shard.file).read_bytes() == (root / "a" / shard.file).read_bytes()
    assert (root / "joined/teachers/b" / MANIFEST_NAME).read_bytes() == (root / "b" / MANIFEST_NAME).read_bytes()
    cache = open_cache(root / "joined")
    cache.verify(progress=False)
    rows = list(cache.sequences(shuffle=True, seed=3, shuffle_buffer=4, teachers=["b"]))
    alone = {row.sample_id: row for row in open_cache(root / "b").sequences()}
    assert len(rows) == a.total_rows
    for row in rows:
        assert np.array_equal(row.teachers["b"].topk_ids, alone[row.sample_id].topk_ids)
        assert np.array_equal(row.teachers["b"].topk_logprobs, alone[row.sample_id].topk_logprobs)


def test_info_and_card_show_every_teacher(two_teachers):
    root, a, b, _ = two_teachers
    output = _run("info", root / "joined").output
    lines = [line for line in output.splitlines() if line.startswith(("teacher 1", "teacher 2"))]
    assert len(lines) == 2 and lines[0].startswith("teacher 1    a: ") and "teachers/b/" in lines[1]
    assert f"{b.teacher['num_parameters']:,} parameters" in lines[1]
    card = (root / "joined" / CARD_NAME).read_text()
    assert "## Teachers" in card and "- b: " in card and b.dump_fingerprint[:12] in card


def test_join_refuses_other_rows_tokenizers_and_shard_layouts(two_teachers, tmp_path):
    root, _, _, corpus = two_teachers
    teacher = root / "tb"
    dump_teacher(str(teacher), str(corpus), tmp_path / "fewer", DumpSettings(top_k=4, limit=10, **SETTINGS),
                 progress=False)
    assert "holds other rows (content_sha256 differs)" in _error(
        _run("merge", root / "a", tmp_path / "fewer", "--teachers", "a,b", "--out", tmp_path / "x"))
    dump_teacher(str(teacher), str(corpus), tmp_path / "layout", DumpSettings(top_k=4, batch_size=8, shard_rows=5),
                 progress=False)
    assert "splits the rows into other shards" in _error(
        _run("merge", root / "a", tmp_path / "layout", "--teachers", "a,b", "--out", tmp_path / "x"))
    other = build_word_tokenizer(LANGUAGE.words + ["zebra"])
    dump_teacher(str(_teacher(tmp_path / "other", other, 2, 16)), str(corpus), tmp_path / "tokens",
                 DumpSettings(top_k=4, **SETTINGS), progress=False)
    assert "has another tokenizer: teachers with different tokenizers cannot share a cache" in _error(
        _run("merge", root / "a", tmp_path / "tokens", "--teachers", "a,b", "--out", tmp_path / "x"))
    assert "must be distinct" in _error(_run("merge", root / "a", root / "b", "--teachers", "a,a", "--out",
                                             tmp_path / "x"))
    assert "has several teachers: merge each teacher's caches" in _error(
        _run("merge", root / "joined", root / "a", "--out", tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_verify_refuses_a_tampered_second_teacher(two_teachers, tmp_path):
    """b's tail log-probs edited and b's manifest rehashed to match: the joined manifest's record of b refuses it; a
    forger who rewrites that record too meets b's own value checks (tails must be ≤ 0)."""
    root = two_teachers[0]
    forged = tmp_path / "forged"
    shutil.copytree(root / "joined", forged)
    second = forged / "teachers" / "b"
    rewrite_shard(second, 0, "tail_logprob", lambda column: map_values(column, lambda values: values + 50))
    rehash(second)
    assert "teachers/b/kdcache.json in cache" in _error(_run("verify", forged))
    data = json.loads((forged / MANIFEST_NAME).read_text())
    data["teachers"][1]["manifest_sha256"] = sha256_file(second / MANIFEST_NAME)
    (forged / MANIFEST_NAME).write_text(json.dumps(data))
    message = _error(_run("verify", forged))
    assert "teachers/b" in message and "shard-00000-00000" in message
    data["teachers"][1]["path"] = "../b"
    (forged / MANIFEST_NAME).write_text(json.dumps(data))
    assert "`teachers[1].path` must be teachers/b" in _error(_run("verify", forged))


def test_copy_and_recode_keep_every_teacher(two_teachers, tmp_path):
    from kdcache.teacher.recode import RecodeSettings, recode_cache
    root = two_teachers[0]
    report = copy_cache(root / "joined", tmp_path / "copy", progress=False)
    assert (tmp_path / "copy" / MANIFEST_NAME).read_bytes() == (root / "joined" / MANIFEST_NAME).read_bytes()
    open_cache(tmp_path / "copy").verify(progress=False)
    assert report.manifest.teacher_names == ["a", "b"]
    with pytest.raises(KDCacheError, match="has several teachers: copy it whole"):
        copy_cache(root / "joined", tmp_path / "part", rows=3, progress=False)
    recoded = recode_cache(root / "joined", tmp_path / "recoded", RecodeSettings(top_k=3), progress=False)
    assert recoded.teacher_names == ["a", "b"] and [entry["top_k"] for entry in recoded.teachers] == [3, 3]
    cache = open_cache(tmp_path / "recoded")
    cache.verify(progress=False)
    row = next(iter(cache.sequences(teachers=["b"])))
    assert row.topk_ids.shape[1] == 3 and row.teachers["b"].topk_ids.shape[1] == 3


def test_student_trains_from_the_ensemble(two_teachers, student_config, tmp_path):
    root = two_teachers[0]
    common = ["train-student", "--cache", root / "joined", "--student-config", student_config, "--max-steps", 2,
              "--batch-size", 4]
    result = _run(*common, "--teachers", "a:0.6,b:0.4", "--out", tmp_path / "student")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(entry["kd"]) for entry in metrics if "kd" in entry)
    assert "names c, but cache" in _error(_run(*common, "--teachers", "a:0.5,c:0.5", "--out", tmp_path / "x"))
    assert "distinct names with positive weights" in _error(_run(*common, "--teachers", "a:-1", "--out",
                                                                 tmp_path / "x"))
    assert "has one teacher" in _error(_run(*common[:2], root / "a", *common[3:], "--teachers", "a:1,b:1",
                                            "--out", tmp_path / "x"))


def test_trainer_trains_from_the_ensemble_as_train_student_does(two_teachers, tokenizer, tmp_path):
    """`DistillationTrainer` with `TrainSettings(teachers=...)` and train-student's recipe (`training_arguments`)
    follows the CLI's `--teachers` run step for step: same seed, same cache, same losses, same weights."""
    import kdcache
    root = two_teachers[0]
    initial = tmp_path / "initial"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=16, layers=1)).save_pretrained(initial)
    tokenizer.save_pretrained(initial)
    common = ["train-student", "--cache", root / "joined", "--student", initial, "--batch-size", 4, "--seed", 5,
              "--shuffle-buffer", 8, "--log-every", 1, "--lr", "1e-2", "--no-verify"]

    def cli_losses(teachers: str, steps: int, out: Path) -> list[float]:
        result = _run(*common, "--max-steps", steps, "--teachers", teachers, "--out", out)
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [entry["loss"] for entry in lines if "loss" in entry]

    mixed, alone = cli_losses("a:0.6,b:0.4", 3, tmp_path / "cli"), cli_losses("a:1", 1, tmp_path / "cli-a")
    assert len(mixed) == 3 and mixed[0] != pytest.approx(alone[0], rel=1e-3), "the mixture is not teacher a alone"

    settings = kdcache.TrainSettings(teachers="a:0.6,b:0.4", max_steps=3, batch_size=4, seed=5, shuffle_buffer=8,
                                     lr=1e-2)
    model = AutoModelForCausalLM.from_pretrained(initial)
    args = kdcache.training_arguments(model, settings, str(tmp_path / "trainer"), logging_steps=1, report_to=[],
                                      use_cpu=True, save_strategy="no")
    trainer = kdcache.DistillationTrainer(model=model, args=args, cache=kdcache.open_cache(root / "joined"),
                                          settings=settings)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    # the first step is the same computation; later ones differ only by the optimizers' rounding and the Trainer
    # exempting biases and norms from weight decay (1e-4 of a norm weight per step here)
    assert losses[0] == pytest.approx(mixed[0], rel=1e-6)
    assert losses == pytest.approx(mixed, rel=1e-3)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_trainer_refuses_unknown_teachers_and_bad_weights_in_one_line(two_teachers, tokenizer, tmp_path):
    """The CLI's refusals, through the public API: the same `KDCacheError` messages, before any training."""
    import kdcache
    root = two_teachers[0]
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=16, layers=1))
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(KDCacheError, match=r"^`teachers` names c, but cache .* has the teachers a, b$"):
        kdcache.DistillationTrainer(model, args, cache=root / "joined", settings=TrainSettings(teachers="a:0.5,c:0.5"))
    with pytest.raises(KDCacheError, match="has one teacher"):
        kdcache.DistillationTrainer(model, args, cache=root / "a", settings=TrainSettings(teachers="a:1,b:1"))
    for bad in ("a:-1", "a:0", "a:x,b:1", "a:1,a:2", "a:inf", ":1"):
        with pytest.raises(KDCacheError, match="^`teachers` must list distinct names with positive weights"):
            TrainSettings(teachers=bad)
    # a dataset of one's own that does not read the other teacher along: one line naming the fix
    trainer = kdcache.DistillationTrainer(model, args, cache=root / "joined", settings=TrainSettings(teachers="a,b"),
                                          train_dataset=kdcache.CacheDataset(root / "joined"))
    with pytest.raises(KDCacheError, match=r"no targets of teacher b .*CacheDataset\(cache, teachers=\['b'\]\)"):
        trainer.train()
