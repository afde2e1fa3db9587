"""Distillation losses as pure functions of tensors.

Every soft-target loss is computed the same way: both teacher and student are reduced to
log-probabilities over one small categorical per position, and one generic function evaluates
the chosen divergence on it.  With cached top-k targets that categorical is the k listed ids
plus one "rest" bucket holding everything else (``tail="rest-bucket"``), so the divergence is
taken between two proper distributions and the teacher's tail mass is never thrown away.

What is exact
-------------
* Student side: always exact.  Its log-probabilities at the listed ids and its mass outside
  them come from the full logits (the rest bucket is ``logsumexp`` over the unlisted logits minus
  the full ``logsumexp``, not ``1 - sum(q)``, which cancels catastrophically).
* Teacher side at T = 1 (the dump temperature): exact up to the cache's storage precision; the
  k+1 entries are renormalised to sum to one, a no-op for exact data.
* The divergence on the (k+1)-categorical is computed exactly, value and gradient.  It is the
  full-vocabulary divergence of the *grouped* distributions.  For the f-divergences (all but
  ``akl`` and ``hard``) it is a lower bound of the full-vocabulary divergence, equal when k = V
  or when the student's distribution inside the tail is proportional to the teacher's.  For forward KL, the gradient for an unlisted token j is ``q_j (1 - p_rest/q_rest)``:
  the teacher's tail mass is spread over the unlisted tokens in proportion to the student's own
  probabilities, the only choice that needs no knowledge of the teacher inside the tail.
* Temperature T != 1: student exact (``logits / T`` over the full vocabulary).  The listed
  teacher entries are re-tempered exactly up to normalisation (``logprob / T``).  The tail at T
  is *not* known from top-k; it is approximated by assuming the tail mass r is spread evenly
  over the ``V - m`` unlisted tokens (m = listed ids at that position)::

      tail_T = (V - m) * (r / (V - m)) ** (1 / T)        (before normalising with the head)

  This is exact at T = 1 and whenever the teacher's unlisted probabilities are all equal.  For
  T > 1, ``x ** (1/T)`` is concave, so by Jensen the approximation is an upper bound of the true
  tempered tail (and, after normalising, the listed probabilities are lower bounds); for T < 1
  it is a lower bound.
* ``k = V`` (every id listed, tail -inf): the sparse loss equals :func:`dense_kd_loss` exactly,
  value and gradient, at every temperature.

Sampled targets (``tail_logprob=None``) hold ``log(count / draws)`` from draws at T = 1; they
sum to one, so the rest bucket is empty.  Forward KL on them,
``sum_i p̂_i (log p̂_i - log q_i)``, has an unbiased gradient for the full-vocabulary forward KL
(the ``log q`` term is linear in p̂; the entropy term has no gradient).  Every other divergence
is non-linear in p̂ (or needs p where the sample is empty, like reverse KL), and a temperature
!= 1 would need draws from the tempered teacher, so those combinations raise ``ValueError``.
``hard`` is allowed and uses the most-drawn id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .settings import DIVERGENCES, TAIL_MODES  # defined there: TrainSettings names them without torch

__all__ = [
    "DIVERGENCES",
    "TAIL_MODES",
    "SparseTargets",
    "dense_kd_loss",
    "hidden_loss",
    "kd_loss",
    "map_targets",
    "mix_targets",
    "next_token_ce",
    "uld_loss",
]

# Divergences whose sampled-target estimate has an unbiased gradient (see module docstring).
_SAMPLED_DIVERGENCES = ("forward_kl", "hard")
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SparseTargets:
    """Teacher targets for N positions, each a list of up to k token ids."""

    ids: torch.Tensor  # int64 [N, k] token ids (padded slots: any valid id, e.g. 0)
    # float [N, k] teacher log-prob at temperature 1, normalised over the FULL vocabulary;
    # -inf marks an absent/padded slot. In no particular order (a cache decodes them most probable first,
    # docs/format.md): nothing here depends on it.
    logprobs: torch.Tensor
    # float [N]: log of the teacher mass OUTSIDE the listed ids at T=1 (exact, computed at dump
    # time; -inf when the ids cover everything). None means the ids are SAMPLED targets:
    # logprobs = log(count/num_draws), an unbiased estimate of the teacher distribution, no tail.
    tail_logprob: torch.Tensor | None


# --------------------------------------------------------------------------- public losses


def kd_loss(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    divergence: str = "forward_kl",
    tail: str = "rest-bucket",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    akl_mu: float = 0.5,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """KD loss of ``student_logits`` [N, V] against cached sparse teacher targets.

    Returns a scalar: the mean over the N positions of the divergence at ``temperature``,
    multiplied by ``temperature**2`` (Hinton et al. 2015: keeps gradient magnitudes comparable
    across temperatures).  V must be the real vocabulary (slice padded vocab columns off first):
    it defines the rest bucket and the number of unlisted tokens.

    Divergences, with p the teacher and q the student (both at T):

    * ``forward_kl`` KL(p‖q); ``reverse_kl`` KL(q‖p);
    * ``jsd``: β·KL(p‖m) + (1-β)·KL(q‖m), m = βp + (1-β)q (TRL GKD convention).  JSD_β itself
      tends to 0 at both ends; as in TRL, β = 0 and β = 1 are defined as the exact forward and
      reverse KL (the limits of JSD_β/β and JSD_β/(1-β));
    * ``skew_forward_kl`` KL(p ‖ λp + (1-λ)q), ``skew_reverse_kl`` KL(q ‖ λq + (1-λ)p)
      (DistiLLM; λ = ``skew``);
    * ``tv``: ½ Σ|p - q|;
    * ``akl``: adaptive KL (Wu et al. 2024): head = smallest set of the teacher's most probable
      categories with mass ≥ ``akl_mu``; loss = g_head/(g_head+g_tail)·FKL +
      g_tail/(g_head+g_tail)·RKL with g = Σ|p - q| over head/tail and the weights detached;
    * ``hard``: cross-entropy of the student against the teacher's most probable listed id
      (explicit distillation with a one-hot target).  Temperature and T² are not applied: a
      one-hot target is unchanged by tempering, and T² only compensates the 1/T² gradient
      shrinkage of softened targets.  ``tail`` is irrelevant to it.

    Tail modes (how the teacher mass outside the listed ids is handled):

    * ``rest-bucket`` (default): divergence on the (k+1)-categorical [listed ids, rest]; see
      "What is exact" in the module docstring.
    * ``renormalize``: teacher and student both renormalised over the listed ids.  Blind to how
      much mass the student keeps outside them, so it biases the student towards an over-confident
      head; kept to compare with peers that do this.
    * ``ignore``: the teacher's listed probabilities as they are (summing to less than one)
      against the student's full-vocabulary log-probs at those ids; each divergence is evaluated
      term by term over the listed ids only, i.e. the rest-bucket loss minus the bucket's term.
      For forward KL this is the cross-entropy against a truncated target: the teacher's tail mass
      is simply dropped, so each position is weighted by its listed mass.

    Memory: the student side runs in chunks of ``chunk_size`` positions, forward and backward,
    with one float32 [chunk, V] working tensor (plus ``logsumexp`` temporaries); nothing [N, V]
    other than the gradient itself is allocated, and no dense teacher tensor is ever built.
    Computation is in float32 (float64 if the logits are float64).  N = 0 returns a zero that
    is still connected to ``student_logits``.  Second derivatives are not supported.
    """
    _check_options(divergence, temperature, beta, skew, akl_mu)
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; expected one of {TAIL_MODES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_targets(student_logits, targets)
    if targets.tail_logprob is None:
        _check_sampled(divergence, tail, temperature)
    if divergence == "hard":
        temperature = 1.0
    dtype = _compute_dtype(student_logits)
    listed = targets.logprobs > _NEG_INF
    student = _StudentCategorical.apply(student_logits, targets.ids.long(), listed, temperature, chunk_size)
    if divergence == "hard":
        per_position = _hard(student[:, :-1], targets.logprobs)
    else:
        teacher = _teacher_categorical(targets, listed, student_logits.shape[-1], temperature, dtype)
        teacher, student = _apply_tail_mode(teacher, student, tail)
        per_position = _divergence(teacher, student, divergence, beta=beta, skew=skew, akl_mu=akl_mu)
    return _mean(per_position) * temperature**2


def dense_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    akl_mu: float = 0.5,
) -> torch.Tensor:
    """Full-vocabulary KD loss (reference for :func:`kd_loss`, and online-KD baselines).

    Same divergences, same temperature handling and T² scaling as :func:`kd_loss`; both inputs
    are [N, V] logits.  Not chunked: it materialises [N, V] probabilities for both sides.
    """
    _check_options(divergence, temperature, beta, skew, akl_mu)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be [N, V], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    dtype = _compute_dtype(student_logits)
    if divergence == "hard":
        per_position = _hard(torch.log_softmax(student_logits.to(dtype), -1), teacher_logits)
        return _mean(per_position)
    student = torch.log_softmax(student_logits.to(dtype) / temperature, -1)
    teacher = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    per_position = _divergence(teacher, student, divergence, beta=beta, skew=skew, akl_mu=akl_mu)
    return _mean(per_position) * temperature**2


def next_token_ce(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Plain cross-entropy, mean over the positions whose label is not ``ignore_index``.

    ``student_logits`` [N, V] and ``labels`` [N] are already aligned (labels[t] is the target of
    logits[t]; shift before calling).  If every label is ignored the result is a zero still
    connected to the logits (``F.cross_entropy`` would return NaN).
    """
    if student_logits.dim() != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and labels [N], got {tuple(student_logits.shape)}, {tuple(labels.shape)}")
    logits = student_logits.to(_compute_dtype(student_logits))
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Feature-matching loss between hidden states [N, d] already projected to the same width.

    ``mse``: mean squared error over all N·d elements.  ``cosine``: 1 - cos(student, teacher)
    per position, mean over positions.  The teacher side gets no gradient.
    """
    if student_hidden.shape != teacher_hidden.shape or student_hidden.dim() != 2:
        raise ValueError(
            f"hidden states must both be [N, d], got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    dtype = _compute_dtype(student_hidden)
    student, teacher = student_hidden.to(dtype), teacher_hidden.detach().to(dtype)
    if kind == "mse":
        return _mean((student - teacher).square().flatten())
    if kind == "cosine":
        return _mean(1.0 - F.cosine_similarity(student, teacher, dim=-1))
    raise ValueError(f"unknown hidden loss kind {kind!r}; expected 'mse' or 'cosine'")


# --------------------------------------------------------------------------- several teachers


def mix_targets(targets: list[SparseTargets], weights: list[float], student_logits: torch.Tensor,
                *, chunk_size: int = 1024) -> SparseTargets:
    """The mixture ``Σ_t w_t p_t`` of several teachers' targets at the same N positions, as one SparseTargets
    (ensemble distillation in probability space); ``weights`` are normalised to sum to one.

    * Sampled and head-tail targets (``tail_logprob`` None, each an unbiased estimate p̂_t of its teacher):
      the union of the ids, each with ``Σ_t w_t p̂_t``; ``E[Σ w_t p̂_t] = Σ w_t p_t``, so the mixture is an
      unbiased estimate of the ensemble and forward KL on it has an unbiased gradient.
    * Top-k targets with their exact tails: the union U of the listed ids plus a rest bucket. Teacher t knows
      its probabilities on its own ids L_t and only the total r_t outside them; as in its own rest-bucket loss,
      that mass is spread over the ids it does not list in proportion to the student's probabilities (detached):
      ``p̃_t(j) = r_t · q_j / q(V∖L_t)``. The mixture of these is again ids + tail: ``Σ_t w_t p̃_t`` on U (a
      teacher's own probability where it lists j, its spread tail where not) and ``Σ_t w_t r_t q(V∖U) /
      q(V∖L_t)`` as the tail. With one teacher this is its targets as stored; where every teacher lists
      every id it is the exact mixture; and forward KL on it has exactly the gradient of
      ``Σ_t w_t KL_rest(p_t ‖ q)``, the teachers' own rest-bucket losses (KL is linear in the target).

    ``student_logits`` [N, V] at T = 1 (only read for top-k targets, never differentiated through). Mixing
    happens at T = 1; a temperature then applies to the mixture as to any cached target.
    """
    if len(targets) != len(weights) or not targets:
        raise ValueError(f"mix_targets needs one weight per target set, got {len(targets)} and {len(weights)}")
    if any(not weight > 0 for weight in weights):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    tails = {target.tail_logprob is None for target in targets}
    if len(tails) != 1:
        raise ValueError("cannot mix top-k targets (with a tail) and sampled targets (without)")
    for target in targets:
        _check_targets(student_logits, target)
    total = sum(weights)
    dtype = torch.float64
    ids = torch.cat([target.ids.long() for target in targets], -1)
    logprobs = torch.cat([target.logprobs.to(dtype) + math.log(weight / total)
                          for target, weight in zip(targets, weights)], -1)
    union = _sum_duplicates(ids, logprobs > _NEG_INF, logprobs)
    listed = union > _NEG_INF
    ids = ids.masked_fill(~listed, 0)
    if targets[0].tail_logprob is None:
        return SparseTargets(ids=ids, logprobs=union, tail_logprob=None)
    with torch.no_grad():
        logits = student_logits.detach()
        student = _StudentCategorical.apply(logits, ids, listed, 1.0, chunk_size).to(dtype)  # [N, K + 1]
        spread, tail = [union], []
        for target, weight in zip(targets, weights):
            own = target.logprobs > _NEG_INF
            rest = _StudentCategorical.apply(logits, target.ids.long(), own, 1.0, chunk_size)[:, -1].to(dtype)
            mass = target.tail_logprob.to(dtype) + math.log(weight / total)
            mass = torch.where(rest > _NEG_INF, mass - rest, _NEG_INF)[:, None]  # log w_t r_t / q(V∖L_t)
            lists = ((ids[:, :, None] == target.ids[:, None, :]) & own[:, None, :]).any(-1)
            spread.append(torch.where(listed & ~lists, mass + student[:, :-1], _NEG_INF))
            tail.append(mass[:, 0] + student[:, -1])
        mixed = torch.logsumexp(torch.stack(spread), 0)
        return SparseTargets(ids=ids, logprobs=mixed, tail_logprob=torch.logsumexp(torch.stack(tail), 0))


# --------------------------------------------------------------------------- across vocabularies


def map_targets(targets: SparseTargets, vocabulary_map: torch.Tensor, rates: torch.Tensor | None = None) -> SparseTargets:
    """Top-k teacher targets re-expressed over a student's vocabulary: the exact part of cross-tokenizer KD.

    ``vocabulary_map`` gives, for each teacher id, the student id of the token with the same text, or
    -1 (any length covering the ids: cross-tokenizer batches index a second copy for tokens read
    after whitespace, see student/crosstok.py).  Listed ids that map keep their probability (several teacher ids mapping to one
    student id, e.g. " The" and " the" for an uncased student, are summed into one slot); everything
    else — unmapped listed ids and the teacher's tail — joins the rest bucket.  So
    ``kd_loss(student_logits, map_targets(targets, map))`` is the divergence on the categorical
    [mapped ids, rest]; with an identity map it is exactly ``kd_loss(student_logits, targets)``.
    ``rates`` (same indexing as the map, in [0, 1]) keeps only ``rate · p`` of a mapped id on its
    student id and moves ``(1 - rate) · p`` to the rest (see student/crosstok.py `estimate_map_rates`);
    rates of 1 change nothing. The result is sorted descending, like cached top-k.
    """
    if targets.tail_logprob is None:
        raise ValueError("mapping targets to another vocabulary needs top-k targets with their tail, not sampled ones")
    student_ids, mapped, kept, unmapped = _mapped_slots(targets, vocabulary_map, rates)
    logprobs = _sum_duplicates(student_ids, mapped, kept)
    tail = torch.logsumexp(torch.cat([targets.tail_logprob[:, None].to(logprobs.dtype), unmapped], dim=1), dim=1)
    logprobs, order = logprobs.sort(dim=-1, descending=True, stable=True)
    return SparseTargets(ids=student_ids.gather(1, order), logprobs=logprobs, tail_logprob=tail)


def _sum_duplicates(ids: torch.Tensor, present: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``logprobs`` [N, K] with the slots of one id (among ``present`` ones) summed into its first slot, the others
    -inf: the same distribution with every id listed once."""
    same = (ids[:, :, None] == ids[:, None, :]) & present[:, :, None] & present[:, None, :]
    merged = torch.logsumexp(torch.where(same, logprobs[:, None, :], _NEG_INF), dim=-1)
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril(-1)
    first = present & ~(same & earlier).any(-1)  # the first slot of each id carries the sum
    return torch.where(first, merged, _NEG_INF)


def uld_loss(student_logits: torch.Tensor, targets: SparseTargets, vocabulary_map: torch.Tensor,
             rates: torch.Tensor | None = None) -> torch.Tensor:
    """ULD-style distance (Boizard et al. 2024) on the teacher mass that has no counterpart in the student's vocabulary.

    No vocabulary mapping is needed for it: at each position the teacher's m listed probabilities
    whose ids do not map (``vocabulary_map`` = -1), sorted descending, face the student's m largest
    probabilities among its tokens that no listed teacher id maps to, sorted descending; the
    teacher's tail mass faces the student's remaining mass outside the mapped tokens::

        uld = Σ_{i<m} |p_(i) - q_(i)| + |p_tail - (q_unmapped - Σ_{i<m} q_(i))|

    an L1 distance between two (m+1)-vectors of sub-probabilities, averaged over positions.  Taken
    with :func:`map_targets` (which puts the same mass in one rest bucket) it says how that mass is
    shaped, not only how much of it there is.  It is 0 when every listed id maps and the student's
    mass outside them equals the teacher's tail (e.g. student = teacher, same tokenizer).  Computed
    at T = 1 on float32 probabilities over the full student vocabulary ([N, V] working tensors).
    With ``rates`` (see :func:`map_targets`), the ``(1 - rate) · p`` a mapped id leaves behind counts
    as unmapped mass here too.
    """
    if targets.tail_logprob is None:
        raise ValueError("uld_loss needs top-k targets with their tail, not sampled ones")
    _check_targets(student_logits, targets)
    student_ids, mapped, kept, unmapped = _mapped_slots(targets, vocabulary_map, rates)
    unlisted = unmapped > _NEG_INF
    teacher = unmapped.exp().sort(dim=-1, descending=True).values
    count = unlisted.sum(-1, keepdim=True)
    probs = torch.softmax(student_logits.to(_compute_dtype(student_logits)), dim=-1)
    targeted = mapped & (kept > _NEG_INF)  # student ids the mapped part gives mass to
    hit = torch.zeros_like(probs).scatter_add_(1, student_ids, targeted.to(probs.dtype)) > 0
    free = probs.masked_fill(hit, 0.0)
    width = min(targets.ids.shape[1], probs.shape[1])
    slots = torch.arange(width, device=probs.device)
    student = torch.where(slots < count, free.topk(width, dim=-1).values, 0.0)
    student_rest = free.sum(-1) - student.sum(-1)
    per_position = (teacher[:, :width] - student).abs().sum(-1) + (targets.tail_logprob.exp() - student_rest).abs()
    return _mean(per_position)


def _mapped_slots(targets: SparseTargets, vocabulary_map: torch.Tensor, rates: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student ids [N, k] with unmapped slots at 0, listed slots whose id maps, log of the mass each slot keeps
    on its student id (rate · p; all of p without rates), log of the mass each listed slot leaves unmapped)."""
    student_ids = vocabulary_map[targets.ids.long()]
    listed = targets.logprobs > _NEG_INF
    mapped = listed & (student_ids >= 0)
    if rates is None:
        kept, spilled = targets.logprobs, torch.full_like(targets.logprobs, _NEG_INF)
    else:
        rate = rates[targets.ids.long()].to(targets.logprobs.dtype).clamp(0.0, 1.0)
        kept, spilled = targets.logprobs + rate.log(), targets.logprobs + torch.log1p(-rate)
    unmapped = torch.where(listed & ~mapped, targets.logprobs, torch.where(mapped, spilled, _NEG_INF))
    return student_ids.clamp(min=0), mapped, kept, unmapped


# --------------------------------------------------------------------------- validation


def _check_options(divergence: str, temperature: float, beta: float, skew: float, akl_mu: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1) (skew = 1 makes the loss identically 0), got {skew}")
    if not 0.0 < akl_mu <= 1.0:
        raise ValueError(f"akl_mu must be in (0, 1], got {akl_mu}")


def _check_targets(student_logits: torch.Tensor, targets: SparseTargets) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if targets.ids.dim() != 2 or targets.ids.shape[0] != n or targets.logprobs.shape != targets.ids.shape:
        raise ValueError(
            f"targets.ids and targets.logprobs must both be [N={n}, k], got "
            f"{tuple(targets.ids.shape)} and {tuple(targets.logprobs.shape)}"
        )
    if targets.tail_logprob is not None and targets.tail_logprob.shape != (n,):
        raise ValueError(f"targets.tail_logprob must be [N={n}], got {tuple(targets.tail_logprob.shape)}")


def _check_sampled(divergence: str, tail: str, temperature: float) -> None:
    """Refuse sampled-target combinations that have no unbiased meaning (module docstring)."""
    if divergence not in _SAMPLED_DIVERGENCES:
        raise ValueError(
            f"divergence {divergence!r} cannot be estimated from sampled targets: "
            f"it is non-linear in the teacher probabilities or needs them where nothing was drawn; "
            f"use one of {_SAMPLED_DIVERGENCES} or a top-k cache"
        )
    if tail == "renormalize":
        raise ValueError(
            "the 'renormalize' tail with sampled targets biases the gradient (the student would be "
            "renormalised over the randomly drawn ids); use 'rest-bucket' or 'ignore', which coincide here"
        )
    if temperature != 1.0 and divergence != "hard":
        raise ValueError(
            f"sampled targets are draws from the teacher at T=1 and cannot be re-tempered without bias; "
            f"got temperature {temperature}"
        )


# --------------------------------------------------------------------------- (k+1)-categoricals


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, float64 kept as is."""
    return torch.promote_types(t.dtype, torch.float32)


def _mean(per_position: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (still in the graph) for an empty input instead of NaN."""
    return per_position.sum() / max(per_position.numel(), 1)


def _listed_index(ids: torch.Tensor, listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the listed slots, for ``index_put_`` into a [rows, V] tensor.

    Padded slots are excluded: their id is arbitrary and may coincide with a real token.
    """
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    return rows[listed], ids[listed]


def _scaled_copy(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``logits / T`` in the compute dtype: the one [chunk, V] working tensor."""
    return logits.to(dtype, copy=True).div_(temperature)


class _StudentCategorical(torch.autograd.Function):
    """Student log-probs on the (k+1)-categorical [listed ids..., rest], chunked over positions.

    Forward and backward each process ``chunk_size`` rows at a time and hold one [chunk, V]
    working tensor; backward re-reads the logits instead of saving softmax outputs, so no
    [N, V] activation is kept between the passes.  Padded slots get -inf.
    """

    @staticmethod
    def forward(ctx, logits, ids, listed, temperature, chunk_size):
        n, k = ids.shape
        out = torch.empty((n, k + 1), dtype=_compute_dtype(logits), device=logits.device)
        for rows in _chunks(n, chunk_size):
            x = _scaled_copy(logits[rows], temperature, out.dtype)
            lse = torch.logsumexp(x, -1, keepdim=True)
            out[rows, :k] = (x.gather(-1, ids[rows]) - lse).masked_fill_(~listed[rows], _NEG_INF)
            x[_listed_index(ids[rows], listed[rows])] = _NEG_INF
            out[rows, k] = torch.logsumexp(x, -1) - lse.squeeze(-1)
        ctx.save_for_backward(logits, ids, listed, out)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # With s = Σ of all incoming gradients, q = softmax(x), q_rest = exp(out[:, k]):
        #   listed j:   dL/dx_j = Σ_{slots of j} g_slot - s·q_j
        #   unlisted j: dL/dx_j = u_j·(g_rest - s·q_rest), u_j = q_j / q_rest ≤ 1 (no overflow).
        logits, ids, listed, out = ctx.saved_tensors
        k = ids.shape[1]
        grad = torch.empty_like(logits)
        for rows in _chunks(ids.shape[0], ctx.chunk_size):
            g_listed = grad_out[rows, :k].masked_fill(~listed[rows], 0.0)
            g_rest, log_q_rest = grad_out[rows, k], out[rows, k]
            s = g_listed.sum(-1) + g_rest
            # No unlisted token (q_rest = 0): every column is overwritten below, any shift works.
            shift = torch.where(log_q_rest > _NEG_INF, log_q_rest, 0.0)
            x = _scaled_copy(logits[rows], ctx.temperature, out.dtype)
            x.sub_((torch.logsumexp(x, -1) + shift)[:, None]).exp_()
            x.mul_((g_rest - s * log_q_rest.exp())[:, None])
            index = _listed_index(ids[rows], listed[rows])
            q_listed = out[rows, :k].exp()
            x.index_put_(index, (-s[:, None] * q_listed)[listed[rows]])
            x.index_put_(index, g_listed[listed[rows]], accumulate=True)
            grad[rows] = x.div_(ctx.temperature)
        return grad, None, None, None, None


def _chunks(n: int, chunk_size: int):
    return (slice(start, start + chunk_size) for start in range(0, n, chunk_size))


def _teacher_categorical(
    targets: SparseTargets, listed: torch.Tensor, vocab: int, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """Teacher log-probs on the (k+1)-categorical at ``temperature``, normalised to sum to one.

    Sampled targets have no tail (their bucket is -inf).  A tail is forced to -inf where all V
    tokens are listed, so storage rounding cannot put mass into an empty bucket.
    """
    logprobs = targets.logprobs.to(dtype)
    if targets.tail_logprob is None:
        tail = torch.full(logprobs.shape[:1], _NEG_INF, dtype=dtype, device=logprobs.device)
    else:
        tail = targets.tail_logprob.to(dtype)
    unlisted = vocab - listed.sum(-1)
    tail = tail.masked_fill(unlisted == 0, _NEG_INF)
    if temperature != 1.0:
        logprobs = logprobs / temperature
        tail = _tempered_tail(tail, unlisted, temperature)
    joint = torch.cat([logprobs, tail[:, None]], -1)
    return joint - torch.logsumexp(joint, -1, keepdim=True)


def _tempered_tail(tail: torch.Tensor, unlisted: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of (V-m)·(r/(V-m))^(1/T): the tail re-tempered as if spread evenly (module docstring)."""
    log_count = unlisted.to(tail.dtype).clamp(min=1).log()
    return torch.where(tail > _NEG_INF, log_count + (tail - log_count) / temperature, tail)


def _apply_tail_mode(teacher: torch.Tensor, student: torch.Tensor, tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the two (k+1)-categoricals into the pair the divergence is taken on."""
    if tail == "rest-bucket":
        return teacher, student
    teacher, student = teacher[:, :-1], student[:, :-1]
    if tail == "renormalize":
        return torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    return teacher, student  # "ignore"


# --------------------------------------------------------------------------- divergences


def _divergence(lp: torch.Tensor, lq: torch.Tensor, name: str, *, beta: float, skew: float, akl_mu: float) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``lp`` and student log-probs ``lq`` [n, K].

    The single generic path for sparse and dense losses.  Every term is a termwise sum, so it
    is also meaningful on sub-probability vectors (``tail="ignore"``).
    """
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return _kl(lp, lq)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _kl(lq, lp)
    if name == "jsd":
        mixture = _log_mix(lp, lq, beta)
        return beta * _kl(lp, mixture) + (1.0 - beta) * _kl(lq, mixture)
    if name == "skew_forward_kl":
        return _kl(lp, _log_mix(lp, lq, skew))
    if name == "skew_reverse_kl":
        return _kl(lq, _log_mix(lq, lp, skew))
    if name == "tv":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if name == "akl":
        return _akl(lp, lq, akl_mu)
    raise AssertionError(f"unhandled divergence {name!r}")  # _check_options guards the names


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Row-wise Σ a·(log a - log b), with 0·log 0 = 0 and finite gradients where a = 0.

    Both inputs are masked *before* the arithmetic: masking only the result would still send
    0·NaN = NaN gradients back through the -inf - -inf terms.
    """
    absent = la == _NEG_INF
    la, lb = la.masked_fill(absent, 0.0), lb.masked_fill(absent, 0.0)
    return (la.exp() * (la - lb)).masked_fill(absent, 0.0).sum(-1)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w·a + (1-w)·b) from log a, log b; -inf (with finite gradients) where both vanish."""
    a = la + math.log(weight) if weight > 0.0 else torch.full_like(la, _NEG_INF)
    b = lb + math.log1p(-weight) if weight < 1.0 else torch.full_like(lb, _NEG_INF)
    both_zero = (a == _NEG_INF) & (b == _NEG_INF)
    mixed = torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0))
    return mixed.masked_fill(both_zero, _NEG_INF)


def _akl(lp: torch.Tensor, lq: torch.Tensor, mu: float) -> torch.Tensor:
    """Adaptive KL: FKL and RKL mixed by the detached head/tail share of Σ|p - q|."""
    with torch.no_grad():
        p_sorted, order = lp.exp().sort(dim=-1, descending=True, stable=True)
        gap = (p_sorted - lq.exp().gather(-1, order)).abs()
        in_head = p_sorted.cumsum(-1) - p_sorted < mu  # smallest prefix with mass >= mu
        gap_head = (gap * in_head).sum(-1)
        gap_total = gap.sum(-1)
        # p = q gives 0/0; both KLs are 0 there, any weight will do.
        w_head = torch.where(gap_total > 0, gap_head / gap_total.clamp(min=torch.finfo(gap.dtype).tiny), 0.5)
    return w_head * _kl(lp, lq) + (1.0 - w_head) * _kl(lq, lp)


def _hard(student_logprobs: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """-log q at the teacher's argmax (over the listed ids for sparse targets)."""
    return -student_logprobs.gather(-1, teacher_scores.argmax(-1, keepdim=True)).squeeze(-1)
