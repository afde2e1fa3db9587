"""Reading labelled data for the classification tasks: label columns and label ids.

Datasets name their labels as ints, strings or `datasets.ClassLabel` ids, in any order; the
teacher's config fixes the order the cache uses. These helpers map one onto the other and name
the column at fault when they cannot.
"""

from __future__ import annotations

from ..errors import KDCacheError
from .base import generic_names


def _label_feature_names(feature) -> list[str] | None:
    """Names of a `ClassLabel` feature, also inside a sequence feature; None for plain ints/strings."""
    import datasets
    inner = getattr(feature, "feature", feature)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def label_encoder(feature, classes: list[str], column: str):
    """A function mapping one dataset label (int id, string name, or ClassLabel id) to the teacher's id.

    ClassLabel ids are translated through their names when the teacher has named labels, so a
    dataset and a teacher that order the same labels differently still line up.
    """
    label2id = {name: index for index, name in enumerate(classes)}
    names = _label_feature_names(feature)
    generic = generic_names(classes)
    if names is not None and not generic:
        missing = sorted(set(names) - set(classes))
        if missing:
            raise KDCacheError(f"labels {missing} of column '{column}' are not among the teacher's labels "
                               f"({', '.join(classes)})")

    def encode(value) -> int:
        if isinstance(value, str):
            if value not in label2id:
                raise KDCacheError(f"label '{value}' in column '{column}' is not one of the teacher's labels "
                                   f"({', '.join(classes)})")
            return label2id[value]
        if names is not None and not generic:
            return label2id[names[value]]
        if not 0 <= int(value) < len(classes):
            raise KDCacheError(f"label {value} in column '{column}' is out of range: the teacher has "
                               f"{len(classes)} labels")
        return int(value)

    return encode


def require_column(rows, column: str, setting: str, source: str) -> None:
    if column not in rows.column_names:
        raise KDCacheError(f"column '{column}' not in dataset {source} (columns: {', '.join(rows.column_names)}); "
                           f"set `{setting}`")


def optional_label_column(rows, column: str | None, default: str, setting: str, source: str) -> str | None:
    """The label column: the one named (must exist), else `default` when present, else None (no gold labels)."""
    if column is not None:
        require_column(rows, column, setting, source)
        return column
    return default if default in rows.column_names else None
