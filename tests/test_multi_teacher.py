"""Several teachers: the mixture of their targets against dense float64 references, and multi-teacher caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
