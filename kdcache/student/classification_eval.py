"""Scoring a classification student against a cache: the seed's "student vs teacher" table.

Three comparisons over the same target positions: student vs the teacher's argmax (how well it
imitates), student vs gold labels and teacher vs gold labels (how good each is), when the cache
holds gold labels (rows without gold, from partly labelled data, count only against the teacher).
Each gives accuracy over targets and, for token classification with IOB2-style
labels, entity-level precision/recall/F1 over sentences (kdcache/entities.py). The teacher's
predictions come from the cache, so the teacher is not loaded.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache.format import Manifest
from ..cache.reader import iter_sequences
from ..cache.store import CacheStore
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
def evaluate_classifier(model, store: CacheStore, manifest: Manifest, *, batch_size: int = 16, device=None,
                        kept_rows: list[np.ndarray] | None = None) -> dict:
    """KL(teacher ‖ student) and the comparisons above, for a token or sequence classification cache
    (only the rows in `kept_rows` if given, see `select_rows`: a held-out split)."""
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
        flat = {"student": logits.argmax(-1), "teacher": batch.sparse_targets().ids[:, 0]}
        if batch.labels is not None:
            flat["gold"] = task.gold_labels(batch)
        counts = batch.targets_at.sum(dim=1).tolist()
        for source, values in flat.items():
            rows[source] += [None if (part == IGNORE_LABEL).any() else [names[index] for index in part.tolist()]
                             for part in values.split(counts)]

    for sequences in chunked(iter_sequences(store, manifest, kept_rows=kept_rows), batch_size):
        score(sequences)
    model.train(was_training)
    entities = task.name == TOKEN_CLASSIFICATION and is_entity_scheme(names)
    result = {"task": task.name, "rows": len(rows["student"]), "targets": targets, "kl_to_teacher": kl_sum / targets}
    for name, (predicted, truth) in COMPARISONS.items():
        if any(row is not None for row in rows[truth]):
            result[name] = _agreement(rows[truth], rows[predicted], entities)
    return result


def format_table(result: dict) -> str:
    """The comparisons side by side, one line each, for the terminal."""
    columns = list(result["student_vs_teacher"])
    lines = [f"{result['task']}: {result['rows']} rows, {result['targets']} targets, "
             f"KL(teacher ‖ student) {result['kl_to_teacher']:.4f}",
             f"{'':20s}" + "".join(f"{column.replace('entity_', 'entity '):>18s}" for column in columns)]
    for name in COMPARISONS:
        if name in result:
            lines.append(f"{name.replace('_', ' '):20s}" + "".join(
                f"{result[name][column]:18d}" if isinstance(result[name][column], int) else f"{result[name][column]:18.4f}"
                for column in columns))
    return "\n".join(lines)
