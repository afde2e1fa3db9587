"""Scoring a classification student against a cache: the seed's "student vs teacher" table.

Three comparisons over the same target positions: student vs the teacher's argmax (how well it
imitates), student vs gold labels and teacher vs gold labels (how good each is), when the cache
holds gold labels (rows without gold, from partly labelled data, count only against the teacher).
Each gives accuracy over targets and, for token classification with IOB2-style
labels, entity-level precision/recall/F1 over sentences (kdcache/entities.py). The teacher's
predictions come from the cache, so the teacher is not loaded.
"""

from __future__ import annotations

import torch

from ..cache.cache import Cache
from ..losses import kd_loss
from ..tasks import IGNORE_LABEL, TOKEN_CLASSIFICATION, get_task
from .batching import chunked, collate
from .entities import entity_scores, is_entity_scheme

COMPARISONS = {"student_vs_teacher": ("student", "teacher"), "student_vs_gold": ("student", "gold"),
               "teacher_vs_gold": ("teacher", "gold")}


def _agreement(truth: list[list[str] | None], predicted: list[list[str]], entities: bool) -> dict[str, float]:
    """Scores over the rows that have a truth (unlabelled rows of partly labelled data have none)."""
    labelled = [index for index, row in enumerate(truth) if row is not None]
    truth, predicted = [truth[index] for index in labelled], [predicted[index] for index in labelled]
    pairs = [(t, p) for true_row, predicted_row in zip(truth, predicted) for t, p in zip(true_row, predicted_row)]
    scores = {"accuracy": sum(t == p for t, p in pairs) / max(len(pairs), 1)}
    if entities:
        scores |= {name if name == "entities" else f"entity_{name}": value
                   for name, value in entity_scores(truth, predicted).items()}
    return scores


@torch.inference_mode()
def evaluate_classifier(model, cache: Cache, *, batch_size: int = 16, device=None) -> dict:
    """KL(teacher ‖ student) and the comparisons above, for a token or sequence classification cache
    (or a subset of one: a held-out split)."""
    manifest = cache.manifest
    task = get_task(manifest.task)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = manifest.labels
    rows: dict[str, list[list[str]]] = {"student": [], "teacher": [], "gold": []}
    kl_sum, targets = 0.0, 0

    def score(sequences) -> None:
        nonlocal kl_sum, targets
        batch = collate(sequences).to(device)
        logits = task.student_logits(model(**batch.model_inputs()).logits, batch, manifest.num_classes).float()
        kl_sum += float(kd_loss(logits, batch.sparse_targets(), divergence="forward_kl", tail="rest-bucket")) * len(logits)
        targets += len(logits)
        sparse = batch.sparse_targets()  # the argmax, not slot 0: the losses' targets promise no order
        flat = {"student": logits.argmax(-1), "teacher": sparse.ids.gather(1, sparse.logprobs.argmax(-1, keepdim=True))[:, 0]}
        if batch.labels is not None:
            flat["gold"] = task.gold_labels(batch)
        counts = batch.targets_at.sum(dim=1).tolist()
        for source, values in flat.items():
            rows[source] += [None if (part == IGNORE_LABEL).any() else [names[index] for index in part.tolist()]
                             for part in values.split(counts)]

    for sequences in chunked(cache.sequences(), batch_size):
        score(sequences)
    model.train(was_training)
    entities = task.name == TOKEN_CLASSIFICATION and is_entity_scheme(names)
    result = {"task": task.name, "rows": len(rows["student"]), "targets": targets, "kl_to_teacher": kl_sum / targets}
    for name, (predicted, truth) in COMPARISONS.items():
        if any(row is not None for row in rows[truth]):
            result[name] = _agreement(rows[truth], rows[predicted], entities)
    return result

