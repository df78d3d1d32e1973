"""What the cell and gene tasks of ``tl.finetune`` share: a fresh classifier and its scores."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

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


def classification_metrics(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix (rows: true classes)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "confusion": confusion_matrix(truth, pred, labels=np.arange(n_classes)),
    }


def auroc(truth: np.ndarray, proba: np.ndarray) -> float:
    """AUROC of the second class with two classes, else one-vs-rest macro AUROC."""
    from sklearn.metrics import roc_auc_score

    if proba.shape[1] == 2:
        return float(roc_auc_score(truth == 1, proba[:, 1]))
    return float(roc_auc_score(truth, proba, multi_class="ovr", labels=np.arange(proba.shape[1])))
