"""Where a multitask classifier's results land: one set of prediction slots per label column.

Each column's predictions go where a single-task run on that column would put them
(``obs[f"{column}_pred"]``, ``obsm[f"{column}_proba"]``), so ``sgf.pl.confusion_matrix(adata,
column)`` reads them as it is; a ``key_added`` prefixes them (``f"{key_added}_{column}"``).
What the tasks share (the split, the ``uns`` summary) goes under ``key_added``, else under the
columns joined by ``"_"``: with one column, exactly the single-task slot names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .._slots import check_key_added


@dataclass(frozen=True)
class TaskKeys:
    """The slot names of one multitask run."""

    shared: str  # obs[f"{shared}_split"], uns[f"{shared}_finetune"] / uns[f"{shared}_predict"]
    prefixes: dict[str, str]  # column -> prefix of obs[f"{p}_pred"] and obsm[f"{p}_proba"]

    def prediction_columns(self) -> list[str]:
        """Return the ``obs`` columns the predictions are written to."""
        return [f"{prefix}_pred" for prefix in self.prefixes.values()]


def task_keys(columns: Sequence[str], key_added: str | None) -> TaskKeys:
    """Name the slots of the tasks ``columns`` under ``key_added``.

    Examples
    --------
    >>> task_keys(["cell_type", "disease"], None)
    TaskKeys(shared='cell_type_disease', prefixes={'cell_type': 'cell_type', 'disease': 'disease'})
    >>> task_keys(["cell_type"], "ref").prefixes
    {'cell_type': 'ref_cell_type'}
    """
    shared = key_added if key_added is not None else "_".join(columns)
    prefixes = {c: c if key_added is None else f"{key_added}_{c}" for c in columns}
    return TaskKeys(shared, prefixes)


def check_task_keys(
    keys: TaskKeys, *, tool: str, uns_suffix: str, reads: Iterable[str | None] = ()
) -> None:
    """Refuse slot names that would overwrite the tokens, or the ``obs`` columns a tool reads.

    Examples
    --------
    >>> keys = task_keys(["a", "a_pred"], None)
    >>> check_task_keys(
    ...     keys, tool="tl.finetune", uns_suffix="finetune", reads=["a", "a_pred"]
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tl.finetune would write its predictions over obs['a_pred'], ...
    """
    check_key_added(
        keys.shared,
        {"obs": [f"{keys.shared}_split"], "uns": [f"{keys.shared}_{uns_suffix}"]},
        tool=tool,
    )
    for prefix in keys.prefixes.values():
        check_key_added(prefix, {"obs": [f"{prefix}_pred"], "obsm": [f"{prefix}_proba"]}, tool=tool)
    read = {column for column in reads if column is not None}
    clash = [column for column in keys.prediction_columns() if column in read]
    if clash:
        raise ValueError(
            f"{tool} would write its predictions over obs[{clash[0]!r}], a column it reads "
            "(label_key or group_key); pass key_added= to prefix the result slots."
        )


def task_columns(proba: np.ndarray, tasks: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Cut probabilities of the tasks side by side into each task's (contiguous) columns.

    Examples
    --------
    >>> blocks = task_columns(np.zeros((4, 5)), {"type": ["B", "T", "NK"], "sick": ["n", "y"]})
    >>> {column: block.shape for column, block in blocks.items()}
    {'type': (4, 3), 'sick': (4, 2)}
    """
    edges = np.cumsum([len(classes) for classes in tasks.values()])[:-1]
    blocks = np.split(proba, edges, axis=1)
    return {c: np.ascontiguousarray(b) for c, b in zip(tasks, blocks, strict=True)}
