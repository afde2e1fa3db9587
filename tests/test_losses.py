"""Tests for kdcache.losses: sparse losses against dense references and hand-written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import DIVERGENCES, TAIL_MODES, SparseTargets, dense_kd_loss, hidden_loss, kd_loss, next_token_ce

SOFT = [d for d in DIVERGENCES if d != "hard"]
F64 = dict(rtol=1e-10, atol=1e-12)


def _logits(n, v, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def _student(n, v, seed=1):
    return _logits(n, v, seed).requires_grad_(True)


def _topk_targets(teacher_logits, k, pad=0, pad_id=None):
    """Exact top-k targets (+ exact tail) from dense teacher logits, optionally with padded slots."""
    logprobs = torch.log_softmax(teacher_logits, -1)
    values, ids = logprobs.topk(k, -1)
    tail = logprobs.scatter(1, ids, -math.inf).logsumexp(-1)
    if pad:
        n = ids.shape[0]
        pid = torch.zeros(n, pad, dtype=torch.long) if pad_id is None else pad_id[:, None].expand(n, pad)
        ids = torch.cat([ids, pid], 1)
        values = torch.cat([values, torch.full((n, pad), -math.inf, dtype=values.dtype)], 1)
    return SparseTargets(ids=ids, logprobs=values, tail_logprob=tail)


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def _grouped(probs, ids):
    """[n, k+1] probabilities: the listed ids, then the summed mass of everything else."""
    listed = probs.gather(1, ids)
    rest = probs.scatter(1, ids, 0.0).sum(-1, keepdim=True)
    return torch.cat([listed, rest], 1)


def _kl(p, q):
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


def _naive(p, q, divergence, beta=0.3, skew=0.1, mu=0.5):
    """Divergences written directly from their definitions in probability space."""
    if divergence == "forward_kl":
        return _kl(p, q)
    if divergence == "reverse_kl":
        return _kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if divergence == "skew_forward_kl":
        return _kl(p, skew * p + (1 - skew) * q)
    if divergence == "skew_reverse_kl":
        return _kl(q, skew * q + (1 - skew) * p)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "akl":
        out = []
        for pr, qr in zip(p, q):
            order = pr.argsort(descending=True).tolist()
            head, mass = [], 0.0
            for i in order:
                if mass >= mu:
                    break
                head.append(i)
                mass += pr[i].item()
            gap = (pr - qr).abs().detach()
            g_head = gap[head].sum()
            w = g_head / gap.sum()
            out.append(w * _kl(pr, qr) + (1 - w) * _kl(qr, pr))
        return torch.stack(out)
    raise AssertionError(divergence)


# --------------------------------------------------------------------------- k = V: sparse == dense


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_equals_dense_when_every_id_listed(divergence, temperature, tail):
    n, v = 6, 9
    teacher, student = _logits(n, v, 0), _student(n, v)
    targets = _topk_targets(teacher, k=v)
    opts = dict(divergence=divergence, temperature=temperature, beta=0.3, skew=0.2, akl_mu=0.6)
    sparse = kd_loss(student, targets, tail=tail, chunk_size=4, **opts)
    dense = dense_kd_loss(student, teacher, **opts)
    torch.testing.assert_close(sparse, dense, **F64)
    torch.testing.assert_close(_grad(sparse, student), _grad(dense, student), **F64)


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_padded_slots_with_a_real_token_id_are_ignored(tail):
    n, v = 5, 12
    teacher, student = _logits(n, v, 0), _student(n, v)
    least_likely = teacher.argmin(-1)  # an unlisted token: masking it as "listed" would be a bug
    plain = kd_loss(student, _topk_targets(teacher, 4), tail=tail, temperature=2.0)
    padded = kd_loss(student, _topk_targets(teacher, 4, pad=3, pad_id=least_likely), tail=tail, temperature=2.0)
    torch.testing.assert_close(padded, plain, **F64)
    torch.testing.assert_close(_grad(padded, student), _grad(plain, student), **F64)


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("divergence", SOFT)
def test_dense_matches_definition(divergence):
    n, v, t = 5, 8, 1.5
    teacher, student = _logits(n, v, 0), _student(n, v)
    p, q = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    expected = _naive(p, q, divergence, beta=0.3, skew=0.1, mu=0.5).mean() * t**2
    got = dense_kd_loss(student, teacher, divergence=divergence, temperature=t, beta=0.3, skew=0.1, akl_mu=0.5)
    torch.testing.assert_close(got, expected, **F64)
    torch.testing.assert_close(_grad(got, student), _grad(expected, student), **F64)


def test_hard_is_cross_entropy_on_teacher_argmax_without_temperature():
    teacher, student = _logits(6, 40, 0, scale=0.3), _student(6, 40)
    expected = F.cross_entropy(student, teacher.argmax(-1))
    targets = _topk_targets(teacher, 3)
    assert torch.all(targets.tail_logprob > targets.logprobs[:, 0])  # the rest bucket is no target
    for t in (1.0, 4.0):
        torch.testing.assert_close(kd_loss(student, targets, divergence="hard", temperature=t), expected, **F64)
        torch.testing.assert_close(dense_kd_loss(student, teacher, divergence="hard", temperature=t), expected, **F64)


def test_jsd_endpoints_are_the_exact_kls():
    teacher, student = _logits(5, 8, 0), _student(5, 8)
    targets = _topk_targets(teacher, 3)
    fkl = kd_loss(student, targets, divergence="forward_kl")
    rkl = kd_loss(student, targets, divergence="reverse_kl")
    torch.testing.assert_close(kd_loss(student, targets, divergence="jsd", beta=0.0), fkl, **F64)
    torch.testing.assert_close(kd_loss(student, targets, divergence="jsd", beta=1.0), rkl, **F64)
    # ... which are the limits of JSD_beta / beta and JSD_beta / (1 - beta).
    # The error is O(beta), so beta must be tiny for a meaningful tolerance.
    eps = 1e-8
    torch.testing.assert_close(kd_loss(student, targets, divergence="jsd", beta=eps) / eps, fkl, rtol=1e-5, atol=0)
    torch.testing.assert_close(kd_loss(student, targets, divergence="jsd", beta=1 - eps) / eps, rkl, rtol=1e-5, atol=0)


def test_temperature_squared_scaling():
    t = 3.0
    teacher, student = _logits(5, 8, 0), _student(5, 8)
    unscaled = _kl(torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)).mean()
    sparse = kd_loss(student, _topk_targets(teacher, 8), temperature=t)
    torch.testing.assert_close(sparse, t**2 * unscaled, **F64)
    torch.testing.assert_close(dense_kd_loss(student, teacher, temperature=t), t**2 * unscaled, **F64)


# --------------------------------------------------------------------------- k < V: the rest bucket


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("divergence", SOFT)
def test_zero_when_student_equals_teacher(divergence, tail):
    logits = _logits(6, 20, 0)
    student = logits.clone().requires_grad_(True)
    loss = kd_loss(student, _topk_targets(logits, 5), divergence=divergence, tail=tail)
    assert abs(loss.item()) < 1e-12


@pytest.mark.parametrize("divergence", SOFT)
def test_zero_at_temperature_when_the_teacher_tail_is_uniform(divergence):
    """The tempered-tail approximation is exact when the unlisted teacher probs are equal."""
    k, t = 4, 2.0
    logits = _logits(6, 20, 0)
    listed = logits.topk(k, -1).indices
    uniform_tail = torch.full_like(logits, logits.min().item() - 1.0).scatter(1, listed, logits.gather(1, listed))
    loss = kd_loss(uniform_tail.clone().requires_grad_(True), _topk_targets(uniform_tail, k), divergence=divergence, temperature=t)
    assert abs(loss.item()) < 1e-12
    # With a non-uniform tail the approximation is visible (so this test can fail).
    skewed = kd_loss(logits.clone(), _topk_targets(logits, k), divergence=divergence, temperature=t)
    assert skewed.item() > 1e-6


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_rest_bucket_is_the_divergence_of_the_grouped_distributions(divergence):
    n, v, k = 6, 15, 4
    teacher, student = _logits(n, v, 0), _student(n, v)
    targets = _topk_targets(teacher, k)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    grouped = _naive(_grouped(p, targets.ids), _grouped(q, targets.ids), divergence).mean()
    got = kd_loss(student, targets, divergence=divergence, beta=0.3)
    torch.testing.assert_close(got, grouped, **F64)
    torch.testing.assert_close(_grad(got, student), _grad(grouped, student), **F64)
    # Grouping inequality: never more than the full-vocabulary divergence, here strictly less.
    assert got.item() < dense_kd_loss(student, teacher, divergence=divergence, beta=0.3).item()


def test_tempered_tail_follows_the_documented_approximation_and_bounds_the_exact_tail():
    n, v, k, t = 6, 15, 4, 2.0
    teacher, student = _logits(n, v, 0), _student(n, v)
    targets = _topk_targets(teacher, k)
    # Documented: listed p^(1/T), tail (V-k)·(r/(V-k))^(1/T), then normalise.
    p = torch.softmax(teacher, -1)
    head = p.gather(1, targets.ids) ** (1 / t)
    r = targets.tail_logprob.exp()
    tail = (v - k) * (r / (v - k)) ** (1 / t)
    approx = torch.cat([head, tail[:, None]], 1)
    approx = approx / approx.sum(-1, keepdim=True)
    expected = _kl(approx, _grouped(torch.softmax(student / t, -1), targets.ids)).mean() * t**2
    torch.testing.assert_close(kd_loss(student, targets, temperature=t), expected, **F64)
    # Jensen: for T > 1 the approximated tempered tail is an upper bound of the exact one.
    exact_tail = _grouped(torch.softmax(teacher / t, -1), targets.ids)[:, -1]
    assert torch.all(approx[:, -1] >= exact_tail)
    assert torch.any(approx[:, -1] > exact_tail + 1e-6)


def test_renormalize_ignores_the_student_tail_mass():
    """The peers' bias: a student that drops the teacher's tail mass is not penalised."""
    n, v, k = 4, 60, 3
    teacher = _logits(n, v, 0, scale=0.3)  # flat teacher: the top-3 hold ~6% of the mass
    targets = _topk_targets(teacher, k)
    assert targets.tail_logprob.exp().min() > 0.8
    head_only = torch.full_like(teacher, -30.0).scatter(1, targets.ids, teacher.gather(1, targets.ids))
    renormalized = kd_loss(head_only, targets, tail="renormalize")
    rest_bucket = kd_loss(head_only, targets, tail="rest-bucket")
    assert renormalized.item() < 1e-9
    assert rest_bucket.item() > 10.0
    # In general it is the KL between the two distributions renormalised over the listed ids.
    student = _student(n, v)
    p_tilde = torch.softmax(targets.logprobs, -1)
    q_tilde = torch.softmax(student.gather(1, targets.ids), -1)
    torch.testing.assert_close(kd_loss(student, targets, tail="renormalize"), _kl(p_tilde, q_tilde).mean(), **F64)


def test_ignore_is_the_rest_bucket_loss_without_the_bucket_term():
    n, v, k = 6, 15, 4
    teacher, student = _logits(n, v, 0), _student(n, v)
    targets = _topk_targets(teacher, k)
    p, log_q = targets.logprobs.exp(), torch.log_softmax(student, -1)
    truncated_ce = (p * (targets.logprobs - log_q.gather(1, targets.ids))).sum(-1)
    got = kd_loss(student, targets, tail="ignore")
    torch.testing.assert_close(got, truncated_ce.mean(), **F64)
    p_rest, q_rest = targets.tail_logprob.exp(), torch.softmax(student, -1).scatter(1, targets.ids, 0.0).sum(-1)
    bucket = (p_rest * (p_rest.log() - q_rest.log())).mean()
    torch.testing.assert_close(got + bucket, kd_loss(student, targets, tail="rest-bucket"), **F64)


def test_tail_reported_with_every_id_listed_is_dropped():
    """Storage rounding may leave a finite tail although all V ids are listed."""
    teacher, student = _logits(4, 6, 0), _student(4, 6)
    exact = _topk_targets(teacher, 6)
    rounded = SparseTargets(exact.ids, exact.logprobs, torch.full((4,), -12.0, dtype=torch.float64))
    torch.testing.assert_close(kd_loss(student, rounded), kd_loss(student, exact), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- sampled targets


def _sampled_targets(probs, rows, draws, seed):
    """Each row: counts of `draws` draws with replacement, listed as all V ids (absent = -inf)."""
    g = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(probs.expand(rows, -1), draws, replacement=True, generator=g)
    counts = torch.zeros(rows, probs.shape[-1], dtype=torch.float64).scatter_add_(1, samples, torch.ones_like(samples, dtype=torch.float64))
    ids = torch.arange(probs.shape[-1]).expand(rows, -1)
    return SparseTargets(ids=ids, logprobs=(counts / draws).log(), tail_logprob=None)


def test_sampled_forward_kl_is_unbiased():
    rows, draws = 20000, 4  # rows are independent replicates (seeds) of a 4-draw estimate
    teacher_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0]], dtype=torch.float64)
    p = torch.softmax(teacher_logits, -1)
    targets = _sampled_targets(p, rows, draws, seed=0)
    torch.testing.assert_close(targets.logprobs.exp().mean(0), p[0], rtol=0, atol=0.01)

    student_logits = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0.0, 1.0]], dtype=torch.float64)
    student = student_logits.expand(rows, -1).clone().requires_grad_(True)
    sampled_grad = _grad(kd_loss(student, targets), student).mean(0) * rows
    dense_student = student_logits.clone().requires_grad_(True)
    dense_grad = _grad(dense_kd_loss(dense_student, teacher_logits), dense_student)[0]
    torch.testing.assert_close(sampled_grad, dense_grad, rtol=0, atol=0.01)
    # The bucket of sampled targets is empty, so "ignore" and "rest-bucket" coincide.
    torch.testing.assert_close(kd_loss(student, targets, tail="ignore"), kd_loss(student, targets), **F64)


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d not in ("forward_kl", "hard")])
def test_sampled_targets_reject_divergences_without_unbiased_estimate(divergence):
    targets = _sampled_targets(torch.full((1, 5), 0.2, dtype=torch.float64), 3, 8, seed=0)
    with pytest.raises(ValueError, match="sampled targets"):
        kd_loss(_student(3, 5), targets, divergence=divergence)


def test_sampled_targets_reject_renormalize_and_temperature():
    targets = _sampled_targets(torch.full((1, 5), 0.2, dtype=torch.float64), 3, 8, seed=0)
    student = _student(3, 5)
    with pytest.raises(ValueError, match="renormalize"):
        kd_loss(student, targets, tail="renormalize")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, targets, temperature=2.0)
    kd_loss(student, targets, divergence="hard", temperature=2.0)  # hard ignores T: allowed


# --------------------------------------------------------------------------- mechanics


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "akl", "hard"])
def test_chunk_size_does_not_change_value_or_gradient(divergence):
    n, v = 10, 13
    teacher, student = _logits(n, v, 0), _student(n, v)
    targets = _topk_targets(teacher, 4, pad=1)
    small = kd_loss(student, targets, divergence=divergence, temperature=2.0, chunk_size=3)
    whole = kd_loss(student, targets, divergence=divergence, temperature=2.0, chunk_size=10**6)
    torch.testing.assert_close(small, whole, **F64)
    torch.testing.assert_close(_grad(small, student), _grad(whole, student), **F64)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_gradient_matches_finite_differences(divergence):
    """Checks the hand-written backward of the chunked student side, with k < V and padding."""
    teacher = _logits(4, 7, 0)
    targets = _topk_targets(teacher, 3, pad=1)
    assert torch.autograd.gradcheck(
        lambda s: kd_loss(s, targets, divergence=divergence, temperature=2.0, chunk_size=3), (_student(4, 7),)
    )


def test_empty_batch_returns_a_connected_zero():
    student = torch.zeros(0, 7, requires_grad=True)
    targets = SparseTargets(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0))
    loss = kd_loss(student, targets)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert student.grad.shape == (0, 7)


def test_half_precision_logits_compute_in_float32():
    teacher, student64 = _logits(8, 32, 0), _student(8, 32)
    targets = _topk_targets(teacher, 5)
    student16 = student64.detach().to(torch.bfloat16).requires_grad_(True)
    loss16 = kd_loss(student16, SparseTargets(targets.ids, targets.logprobs.half(), targets.tail_logprob.float()))
    assert loss16.dtype == torch.float32
    loss16.backward()
    assert student16.grad.dtype == torch.bfloat16
    reference = kd_loss(student16.detach().double(), targets)
    torch.testing.assert_close(loss16.double(), reference, rtol=2e-3, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(divergence="kl"), "unknown divergence"),
        (dict(tail="drop"), "unknown tail mode"),
        (dict(temperature=0.0), "temperature"),
        (dict(divergence="jsd", beta=1.5), "beta"),
        (dict(skew=1.0), "skew"),
        (dict(akl_mu=0.0), "akl_mu"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_invalid_options_raise(kwargs, match):
    teacher, student = _logits(3, 6, 0), _student(3, 6)
    with pytest.raises(ValueError, match=match):
        kd_loss(student, _topk_targets(teacher, 2), **kwargs)


def test_invalid_shapes_raise():
    teacher, student = _logits(3, 6, 0), _student(3, 6)
    with pytest.raises(ValueError, match="N=4"):
        kd_loss(_student(4, 6), _topk_targets(teacher, 2))
    with pytest.raises(ValueError, match="unknown divergence"):
        dense_kd_loss(student, teacher, divergence="kl")
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        dense_kd_loss(student, teacher[:, :5])


# --------------------------------------------------------------------------- CE and hidden losses


def test_next_token_ce_is_mean_over_non_ignored():
    student = _student(6, 9)
    labels = torch.tensor([1, -100, 3, 8, -100, 0])
    torch.testing.assert_close(next_token_ce(student, labels), F.cross_entropy(student, labels), **F64)
    empty = next_token_ce(student, torch.full((6,), -100))
    assert empty.item() == 0.0 and empty.grad_fn is not None


def test_hidden_losses():
    s, t = _student(5, 4), _logits(5, 4, 2)
    torch.testing.assert_close(hidden_loss(s, t, "mse"), ((s - t) ** 2).mean(), **F64)
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    torch.testing.assert_close(hidden_loss(s, t, "cosine"), (1 - cos).mean(), **F64)
    assert hidden_loss(t, t, "cosine").abs().item() < 1e-12
    with pytest.raises(ValueError, match="kind"):
        hidden_loss(s, t, "l1")
