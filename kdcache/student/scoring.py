"""Scoring a student against a cache: how close to the teacher, and how good on the text.

The teacher's own next-token NLL comes from the cache's manifest (computed at dump time from the
full distribution over the whole cache), so it matches the student's positions exactly when the
whole cache is scored. KL to the teacher is the top-k + rest-bucket estimate when the cache holds
top-k targets; on a sampled-only cache it is Σ p̂ log(p̂ / q) over the drawn ids, whose
cross-entropy part is unbiased but whose plug-in entropy makes it read high.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.cache import Cache, as_cache
from ..cache.format import column_groups
from ..losses import kd_loss
from ..tasks import CAUSAL_LM
from .batching import chunked, collate
from .classification_eval import evaluate_classifier


@torch.inference_mode()
def evaluate(model, cache: Cache | Path | str, *, batch_size: int = 16, device: torch.device | str | None = None,
             sample_ids: Iterable[int] | None = None) -> dict:
    """Score `model` against the teacher targets of `cache` (a `Cache`, a path or a URL).

    Causal LM: mean KL(teacher ‖ student) (T=1), top-1 agreement, NLL and perplexity. Classification
    caches are scored by `evaluate_classifier` (accuracy, entity F1, vs teacher and gold).
    `sample_ids` limits scoring to those sequences (a held-out split, see `Cache.split`).
    """
    cache = as_cache(cache)
    if sample_ids is not None:
        cache = cache.subset(sample_ids)
    manifest = cache.manifest
    if manifest.task != CAUSAL_LM:
        return evaluate_classifier(model, cache, batch_size=batch_size, device=device)
    kind = "topk" if "topk" in column_groups(manifest.target_types) else "sampled"
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    kl_sum = agree = nll_sum = positions = labelled = 0.0

    def score(sequences) -> None:
        nonlocal kl_sum, agree, nll_sum, positions, labelled
        batch = collate(sequences).to(device)
        logits = model(**batch.model_inputs()).logits
        logits = logits[batch.targets_at][:, :manifest.vocab_size].float()
        targets = batch.sparse_targets(kind)
        count = logits.shape[0]
        kl_sum += float(kd_loss(logits, targets, divergence="forward_kl", tail="rest-bucket")) * count
        teacher_top1 = targets.ids.gather(1, targets.logprobs.argmax(-1, keepdim=True)).squeeze(1)
        agree += float((logits.argmax(-1) == teacher_top1).sum())
        labels = batch.next_token_labels()
        nll_sum += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        labelled += float((labels != -100).sum())
        positions += count

    for sequences in chunked(cache.sequences(), batch_size):
        score(sequences)
    model.train(was_training)
    nll = nll_sum / max(labelled, 1)
    return {"task": CAUSAL_LM, "kl_to_teacher": kl_sum / positions, "top1_agreement": agree / positions, "nll": nll,
            "perplexity": math.exp(nll), "teacher_nll": manifest.stats.get("teacher_nll"),
            "positions": int(positions), "targets": kind}
