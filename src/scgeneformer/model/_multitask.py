"""A cell classifier with one head per label column: one encoder, several tasks.

The heads are row blocks of one linear layer, ``hidden -> sum of the tasks' classes``: block
``t`` is task ``t``'s head, of the shape a single-task head has, and no weight is shared
between blocks, so it is exactly one linear layer per task. Kept as one layer, the classifier
is an ordinary ``BertForSequenceClassification`` on disk (its logits are the tasks' logits
side by side; ``config.json`` records the tasks under ``"tasks"``), and with one task it is the
single-task classifier bit for bit: same parameters, same initial draws, same forward.

Geneformer's own ``MTLClassifier`` can pool with attention instead of the pooler; that is
not built here (the pooler on position 0 is kept, as in the single-task classifier).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..vocab import Vocabulary
from ._classifier import GeneformerClassifier, Task
from ._geneformer import Geneformer


def check_tasks(tasks: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Return ``tasks`` as ``{column: [class, ...]}`` if every task is usable, else raise.

    Examples
    --------
    >>> check_tasks({"cell_type": ["B", "T"], "disease": ["healthy", "sick"]})
    {'cell_type': ['B', 'T'], 'disease': ['healthy', 'sick']}
    """
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(
            f"A multitask classifier needs a mapping column -> classes, got {tasks!r}."
        )
    checked = {}
    for column, classes in tasks.items():
        classes = [str(c) for c in classes]
        if not isinstance(column, str) or len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(
                f"Task {column!r} needs a name and at least two distinct classes, got {classes}."
            )
        checked[column] = classes
    return checked


class MultitaskClassifier(GeneformerClassifier):
    """A :class:`GeneformerClassifier` for cells with one head per task (label column).

    :meth:`forward` returns the tasks' logits side by side, ``(cells, sum of n_classes)``;
    :meth:`split_logits` cuts them per task and :meth:`class_probabilities` takes a softmax
    within each task. :attr:`classes` holds ``"column: class"`` names in logit order (as
    ``id2label`` on disk); :attr:`tasks` the classes per column.

    Parameters
    ----------
    encoder
        The encoder, used as it is (not copied).
    classes
        ``{column: [class, ...]}``, the tasks in head order.
    task
        Must be ``"cell"`` (the gene task has one label set).
    classifier_dropout
        As :class:`GeneformerClassifier`.
    label_key
        Unused by the tasks' results (they are named by :attr:`tasks`); kept for the signature.

    Examples
    --------
    >>> import scgeneformer as sgf, torch
    >>> from scgeneformer.model._multitask import MultitaskClassifier
    >>> genes = [f"ENSG{i:011d}" for i in range(50)]
    >>> vocab = sgf.Vocabulary({g: i + 2 for i, g in enumerate(genes)}, dict.fromkeys(genes, 1.0))
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    >>> tasks = {"type": ["B", "T", "NK"], "disease": ["healthy", "sick"]}
    >>> clf = MultitaskClassifier.from_encoder(model, tasks, random_state=0).eval()
    >>> logits = clf(torch.tensor([[5, 9, 3, 0], [7, 2, 8, 11]]))
    >>> logits.shape, [block.shape[1] for block in clf.split_logits(logits).values()]
    (torch.Size([2, 5]), [3, 2])
    """

    def __init__(
        self,
        encoder: Geneformer,
        classes: Mapping[str, Sequence[str]],
        *,
        task: Task = "cell",
        classifier_dropout: float | None = None,
        label_key: str | None = None,
    ) -> None:
        if task != "cell":
            raise ValueError(f"A multitask classifier classifies cells, not task={task!r}.")
        tasks = check_tasks(classes)
        flat = [f"{column}: {name}" for column, names in tasks.items() for name in names]
        super().__init__(
            encoder, flat, task="cell", classifier_dropout=classifier_dropout, label_key=label_key
        )
        self.tasks = tasks

    @classmethod
    def from_flat(
        cls, flat: GeneformerClassifier, tasks: Mapping[str, Sequence[str]]
    ) -> MultitaskClassifier:
        """Read a loaded single-head classifier as the tasks it was saved with (weights shared).

        Examples
        --------
        >>> flat = GeneformerClassifier(model, ["type: B", "type: T", "sick: no", "sick: yes"])
        >>> MultitaskClassifier.from_flat(flat, {"type": ["B", "T"], "sick": ["no", "yes"]}).columns
        ['type', 'sick']
        """
        clf = cls(flat.encoder, tasks, classifier_dropout=flat.classifier_dropout)
        if clf.classes != flat.classes:
            raise ValueError(
                f"The classifier's classes {flat.classes} are not those of its tasks "
                f"{clf.tasks} (config.json 'id2label' and 'tasks' disagree)."
            )
        clf.pooler, clf.classifier = flat.pooler, flat.classifier
        clf.history, clf.training_args = flat.history, flat.training_args
        clf.adapter = flat.adapter  # a LoRA classifier's adapters live in the shared encoder
        return clf.to(flat.device).train(flat.training)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, vocab: Vocabulary | None = None
    ) -> MultitaskClassifier:
        """Load a folder written by :meth:`save` (as :meth:`GeneformerClassifier.from_pretrained`).

        Examples
        --------
        >>> clf = MultitaskClassifier.from_pretrained("my_classifier")  # doctest: +SKIP
        """
        clf = GeneformerClassifier.from_pretrained(folder, vocab)
        if not isinstance(clf, MultitaskClassifier):
            raise ValueError(
                f"The classifier in {str(folder)!r} has one task (no 'tasks' in config.json); "
                "load it with sgf.GeneformerClassifier.from_pretrained."
            )
        return clf

    def _config_extras(self) -> dict[str, Any]:
        return {"tasks": self.tasks}

    @property
    def columns(self) -> list[str]:
        """The label columns, in head order."""
        return list(self.tasks)

    @property
    def task_sizes(self) -> list[int]:
        """Number of classes of each task, in head order."""
        return [len(classes) for classes in self.tasks.values()]

    def split_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut ``(cells, sum of n_classes)`` logits into each task's ``(cells, n_classes)``."""
        return dict(zip(self.tasks, logits.split(self.task_sizes, dim=-1), strict=True))

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax within each task's block of logits (float32), blocks side by side."""
        blocks = self.split_logits(logits.float()).values()
        return torch.cat([torch.softmax(block, dim=-1) for block in blocks], dim=-1)

    def extra_repr(self) -> str:
        """Summarise the tasks in the module's repr."""
        return "tasks=" + ", ".join(f"{c} ({len(k)})" for c, k in self.tasks.items())


__all__ = ["MultitaskClassifier", "check_tasks"]
