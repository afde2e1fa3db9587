"""One table comparing students, and the teacher where it has a figure, on the same cache.

`kdcache eval` scores several students against one cache; reading them side by side is the point
(the seed article's "student vs teacher" table), so every task's results are laid out here, in one
place. The teacher's row comes from the cache itself, never from loading the teacher: for a causal
LM its next-token NLL recorded at dump time (over the whole cache), for classification its argmax
against the gold labels. A cell with no meaning for a row (the teacher's KL to itself) shows "-".
"""

from __future__ import annotations

import math

from ..errors import warn
from ..tasks import CAUSAL_LM

TEACHER = "teacher (cached)"

# A distilled student whose KL to the teacher is above this share of a CE-only baseline's is still about as
# far from the teacher as a student that never saw the soft targets: distillation gained little.
FAR_FROM_TEACHER_SHARE = 0.9

# (column header, how to read it from a result); a reader returning None leaves the cell "-".
_CAUSAL_LM_COLUMNS = (
    ("KL(T‖S)", lambda result: result["kl_to_teacher"]),
    ("top-1 agr", lambda result: result["top1_agreement"]),
    ("NLL", lambda result: result["nll"]),
    ("perplexity", lambda result: result["perplexity"]),
)


_SHORT = {"accuracy": "acc", "entity_precision": "ent P", "entity_recall": "ent R", "entity_f1": "ent F1"}


def _score(comparison: str, metric: str):
    return lambda result: result.get(comparison, {}).get(metric)


def _classification_columns(results: list[dict]) -> list[tuple]:
    """Accuracy (and entity P/R/F1 when the labels are IOB2-style) vs the teacher and vs gold."""
    first = results[0]
    metrics = [name for name in first["student_vs_teacher"] if name != "entities"]
    columns = [("KL(T‖S)", lambda result: result["kl_to_teacher"])]
    columns += [(f"{_SHORT[metric]} vs T", _score("student_vs_teacher", metric))
                for metric in metrics]
    if "student_vs_gold" in first:
        columns += [(f"{_SHORT[metric]} vs gold", _score("student_vs_gold", metric))
                    for metric in metrics]
    return columns


def comparison_table(results: dict[str, dict]) -> str:
    """`results` maps a row name (the student as given) to what `evaluate` returned for it, every
    result from the same cache (or the same held-out part of it)."""
    rows = list(results.items())
    first = rows[0][1]
    task = first.get("task", CAUSAL_LM)
    if task == CAUSAL_LM:
        columns = list(_CAUSAL_LM_COLUMNS)
        teacher_nll = first.get("teacher_nll")
        teacher = ({"nll": teacher_nll, "perplexity": math.exp(teacher_nll)} if teacher_nll is not None else None)
        header = (f"{task}: {first['positions']} positions, KL on the {first['targets']} targets; the teacher's "
                  f"NLL is over the whole cache")
    else:
        columns = _classification_columns([result for _, result in rows])
        teacher = ({"student_vs_gold": first["teacher_vs_gold"]} if "teacher_vs_gold" in first else None)
        header = f"{task}: {first['rows']} rows, {first['targets']} targets"
    if teacher is not None:
        rows.insert(0, (TEACHER, {key: None for key in ("kl_to_teacher", "top1_agreement")} | teacher))
    width = max(len(name) for name, _ in rows)
    widths = [max(len(title), 9) for title, _ in columns]
    lines = [header, f"{'':{width}s}" + "".join(f"  {title:>{w}s}" for (title, _), w in zip(columns, widths))]
    for name, result in rows:
        cells = []
        for (_, read), w in zip(columns, widths):
            value = read(result)
            cells.append(f"  {'-':>{w}s}" if value is None else f"  {value:>{w}.4f}")
        lines.append(f"{name:{width}s}" + "".join(cells))
    return "\n".join(lines)


def warn_far_from_teacher(results: dict[str, dict], baseline: str) -> None:
    """One warning per student of `results` that is not clearly closer to the teacher (held-out KL) than
    `baseline`, a student trained without the soft targets (CE only) on the same budget, scored on the
    same rows: the comparison that tells a weak distillation run from a hard task."""
    reference = results[baseline]["kl_to_teacher"]
    for name, result in results.items():
        kl = result["kl_to_teacher"]
        if name == baseline or not kl > FAR_FROM_TEACHER_SHARE * reference:
            continue
        warn(f"{name} is still far from the teacher: KL {kl:.4f}, {kl / reference:.0%} of the CE-only baseline "
             f"{baseline}'s {reference:.4f}; distillation gained little: try a larger `lr` or more steps "
             f"(a `val_fraction` run shows when the held-out KL stops falling)")
