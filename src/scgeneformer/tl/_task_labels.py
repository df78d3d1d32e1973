"""Labels of a multitask fine-tuning: several ``obs`` columns, each with its own missing cells.

A missing label (NaN, None, a missing category) leaves the cell out of that task only: its code
is :data:`UNLABELLED`, which is ``torch.nn.functional.cross_entropy``'s ``ignore_index``, so the
cell adds nothing to that task's loss and is not counted in its mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from anndata import AnnData

from ._labels import encode_labels, obs_column

UNLABELLED = -100  # F.cross_entropy's default ignore_index

TaskWeights = Literal["size"] | Mapping[str, float] | None


def check_label_columns(label_key: Sequence[str], *, task: str, n_splits: int) -> list[str]:
    """Return a multitask ``label_key`` as a list of columns if it is usable, else raise.

    Examples
    --------
    >>> check_label_columns(("cell_type", "disease"), task="cell", n_splits=1)
    ['cell_type', 'disease']
    """
    if isinstance(label_key, str) or not isinstance(label_key, Sequence):
        raise TypeError(
            f"label_key must be an obs column or a list of them, got {type(label_key).__name__}."
        )
    columns = list(label_key)
    if not columns or not all(isinstance(c, str) for c in columns):
        raise TypeError(f"label_key as a list must hold obs column names, got {columns!r}.")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ValueError(f"label_key lists {duplicated} more than once; give each column once.")
    if task != "cell":
        raise ValueError(
            "label_key as a list (one head per column) is for task='cell'; the gene task takes "
            "one label_key."
        )
    if n_splits > 1:
        # Cross-validation summarises one label set per split; per-task summaries are not built.
        raise ValueError(
            f"n_splits={n_splits} cross-validates one label column; with label_key as a list, "
            "use n_splits=1 (one train/validation/test split), or fine-tune each column alone."
        )
    return columns


def check_task_weights(task_weights: TaskWeights, columns: list[str]) -> TaskWeights:
    """Return ``task_weights`` checked against the columns (a mapping as plain floats).

    Examples
    --------
    >>> check_task_weights({"disease": 2, "cell_type": 1}, ["cell_type", "disease"])
    {'cell_type': 1.0, 'disease': 2.0}
    """
    if task_weights is None or task_weights == "size":
        return task_weights
    if not isinstance(task_weights, Mapping):
        raise ValueError(
            f"task_weights must be None (equal), 'size' or a mapping column -> weight, got "
            f"{task_weights!r}."
        )
    if set(task_weights) != set(columns):
        raise ValueError(
            f"task_weights names {sorted(map(str, task_weights))}, but label_key lists "
            f"{columns}; give one weight per column."
        )
    weights = {c: float(task_weights[c]) for c in columns}
    bad = {c: w for c, w in weights.items() if not (math.isfinite(w) and w > 0)}
    if bad:
        raise ValueError(
            f"task_weights must be positive and finite, got {bad}; to leave a task out, drop its "
            "column from label_key."
        )
    return weights


@dataclass(frozen=True)
class TaskLabels:
    """Integer codes per column (:data:`UNLABELLED` where missing) and each column's classes."""

    codes: dict[str, np.ndarray]
    classes: dict[str, list[str]]

    @property
    def columns(self) -> list[str]:
        """The label columns, in head order."""
        return list(self.codes)

    def labelled(self, column: str, cells: np.ndarray | None = None) -> np.ndarray:
        """Return the cells (of ``cells``, default all) that have a label in ``column``."""
        codes = self.codes[column]
        cells = np.arange(len(codes)) if cells is None else cells
        return cells[codes[cells] != UNLABELLED]

    def any_labelled(self) -> np.ndarray:
        """Mask of the cells labelled in at least one column."""
        return np.any([c != UNLABELLED for c in self.codes.values()], axis=0)

    def strata(self) -> np.ndarray:
        """Return the first column's codes, unlabelled cells as one more class (for the split)."""
        first = self.codes[self.columns[0]]
        return np.where(first == UNLABELLED, len(self.classes[self.columns[0]]), first)


def task_labels(adata: AnnData, columns: list[str]) -> TaskLabels:
    """Read, check and encode each label column (classes as in the single task)."""
    codes, classes = {}, {}
    for column in columns:
        values = obs_column(adata, column, "label_key")
        present = values.notna().to_numpy()
        if not present.any():
            raise ValueError(
                f"obs[{column!r}] (in label_key) has no labels: all {len(values):,} cells are "
                "missing (NaN); drop the column from label_key."
            )
        where = f"obs[{column!r}]"
        known, classes[column] = encode_labels(values[present], where, "unreachable")
        codes[column] = np.full(len(values), UNLABELLED, dtype=np.int64)
        codes[column][present] = known
    return TaskLabels(codes, classes)


def resolve_task_weights(
    task_weights: TaskWeights, labels: TaskLabels, train: np.ndarray
) -> dict[str, float]:
    """Each task's loss weight, summing to 1 (so the loss keeps one task's scale).

    None weighs the tasks alike; ``"size"`` by their labelled training cells (so every
    labelled cell and task counts alike); a mapping as given, rescaled.

    Examples
    --------
    >>> labels = TaskLabels({"a": np.array([0, 1, 1, 0]), "b": np.array([0, -100, 1, -100])},
    ...                     {"a": ["x", "y"], "b": ["u", "v"]})
    >>> resolve_task_weights("size", labels, np.arange(4))
    {'a': 0.6666666666666666, 'b': 0.3333333333333333}
    """
    if task_weights is None:
        raw = dict.fromkeys(labels.columns, 1.0)
    elif task_weights == "size":
        raw = {c: float(len(labels.labelled(c, train))) for c in labels.columns}
    else:
        raw = dict(task_weights)
    total = sum(raw.values())
    return {c: w / total for c, w in raw.items()}
