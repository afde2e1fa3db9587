"""Scoring a student against a cache: how close to the teacher, and how good on the text.

The teacher's own next-token NLL comes from the cache's manifest (computed at dump time from the
full distribution over the whole cache), so it matches the student's positions exactly when the
whole cache is scored. KL to the teacher is the top-k + rest-bucket estimate when the cache holds
top-k targets; on a sampled-only cache it is Σ p̂ log(p̂ / q) over the drawn ids, whose
cross-entropy part is unbiased but whose plug-in entropy makes it read high.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.reader import iter_sequences, select_rows
from ..cache.store import CacheStore, as_store
from ..losses import kd_loss
from ..tasks import CAUSAL_LM
from .batching import chunked, collate
from .classification_eval import evaluate_classifier


@torch.inference_mode()
def evaluate_student(model, cache: CacheStore | Path | str, *, batch_size: int = 16, device: torch.device | str | None = None,
                     sample_ids: frozenset[int] | None = None) -> dict:
    """Mean KL(teacher ‖ student) (T=1), top-1 agreement, NLL and perplexity.

    `sample_ids` limits scoring to those sequences (a held-out split, see kdcache/split.py).
    Classification caches are scored by `evaluate_classifier` (accuracy, entity F1, vs teacher and gold).
    """
    store = as_store(cache)
    manifest = store.load_manifest()
    kept_rows = None if sample_ids is None else select_rows(store, manifest, sample_ids)
    if manifest.task != CAUSAL_LM:
        return evaluate_classifier(model, store, manifest, batch_size=batch_size, device=device, kept_rows=kept_rows)
    kind = "topk" if "topk" in manifest.target_types else "sampled"
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    kl_sum = agree = nll_sum = positions = labelled = 0.0

    def score(sequences) -> None:
        nonlocal kl_sum, agree, nll_sum, positions, labelled
        batch = collate(sequences).to(device)
        logits = model(**batch.model_inputs()).logits
        logits = logits[batch.valid][:, :manifest.vocab_size].float()
        targets = batch.sparse_targets(kind)
        count = logits.shape[0]
        kl_sum += float(kd_loss(logits, targets, divergence="forward_kl", tail="rest-bucket")) * count
        teacher_top1 = targets.ids.gather(1, targets.logprobs.argmax(-1, keepdim=True)).squeeze(1)
        agree += float((logits.argmax(-1) == teacher_top1).sum())
        labels = batch.next_token_labels()
        nll_sum += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        labelled += float((labels != -100).sum())
        positions += count

    for sequences in chunked(iter_sequences(store, manifest, kept_rows=kept_rows), batch_size):
        score(sequences)
    model.train(was_training)
    nll = nll_sum / max(labelled, 1)
    return {"kl_to_teacher": kl_sum / positions, "top1_agreement": agree / positions, "nll": nll,
            "perplexity": math.exp(nll), "teacher_nll": manifest.stats.get("teacher_nll"),
            "positions": int(positions), "targets": kind}
