"""What the cell and gene tasks of ``tl.finetune`` share: a fresh classifier (scores: _metrics)."""

from __future__ import annotations

from typing import Literal

from ..model import Geneformer
from ..model._classifier import GeneformerClassifier


def new_classifier(
    model: Geneformer,
    classes: list[str],
    *,
    task: Literal["cell", "gene"],
    label_key: str,
    freeze_layers: int,
    random_state: int,
) -> GeneformerClassifier:
    """Copy ``model`` under a fresh head for ``classes``, its first layers frozen."""
    clf = GeneformerClassifier.from_encoder(
        model, classes, task=task, label_key=label_key, random_state=random_state
    )
    clf.freeze_layers(freeze_layers)
    return clf
