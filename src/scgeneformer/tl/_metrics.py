"""Scores of a classifier's class probabilities: one definition for the model and baselines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The scores that are summarised over cross-validation splits (mean and standard deviation).
SPLIT_SCORES = ("macro_f1", "accuracy", "auroc")


def auroc(truth: np.ndarray, proba: np.ndarray) -> float:
    """AUROC of the second class with two classes, else one-vs-rest macro AUROC.

    NaN when the truth holds a single class (the AUROC is undefined there), or, with more
    than two classes, when some class is absent.

    Examples
    --------
    >>> auroc(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]]))
    1.0
    """
    from sklearn.metrics import roc_auc_score

    n_classes = proba.shape[1]
    present = np.unique(truth)
    if len(present) < 2 or (n_classes > 2 and len(present) < n_classes):
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(truth == 1, proba[:, 1]))
    return float(roc_auc_score(truth, proba, multi_class="ovr", labels=np.arange(n_classes)))


def classification_scores(truth: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1, AUROC and the confusion matrix of class probabilities.

    The predicted class is each row's most probable one.

    Parameters
    ----------
    truth
        Integer class of each item, in ``0 .. n_classes - 1``.
    proba
        ``(items, n_classes)`` class probabilities.

    Returns
    -------
    ``{"accuracy", "macro_f1", "f1_per_class", "auroc", "confusion"}``: ``f1_per_class`` is a
    list in class order (0 for a class neither present nor predicted), ``auroc`` as
    :func:`auroc`, ``confusion`` the ``(n_classes, n_classes)`` counts (rows the truth).

    Examples
    --------
    >>> scores = classification_scores(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.7, 0.3],
    ...                                                                 [0.2, 0.8]]))
    >>> round(scores["accuracy"], 3), [round(f, 3) for f in scores["f1_per_class"]]
    (0.667, [0.667, 0.667])
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    n_classes = proba.shape[1]
    pred = proba.argmax(axis=1)
    labels = np.arange(n_classes)
    per_class = f1_score(truth, pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "f1_per_class": [float(f) for f in per_class],
        "auroc": auroc(truth, proba),
        "confusion": confusion_matrix(truth, pred, labels=labels),
    }


def validation_scores(truth: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """Mean negative log-likelihood and macro-F1 of validation cells (early stopping's score).

    Examples
    --------
    >>> validation_scores(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    (0.164252033486018, 1.0)
    """
    from sklearn.metrics import f1_score

    nll = -np.log(np.clip(proba[np.arange(len(truth)), truth], 1e-12, None)).mean()
    macro_f1 = f1_score(truth, proba.argmax(axis=1), average="macro", zero_division=0)
    return float(nll), float(macro_f1)


def summarise_splits(per_split: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-split scores as lists, with their mean and sample standard deviation.

    Returns ``{"splits": {score: [one per split], "f1_per_class": (splits, classes)}, score:
    mean, f"{score}_sd": SD, "f1_per_class": mean per class}`` for each score of
    ``SPLIT_SCORES``. The SD is the sample one (``ddof=1``); NaN splits (an undefined AUROC)
    are left out of both.

    Examples
    --------
    >>> s = summarise_splits([{"macro_f1": 0.5, "accuracy": 0.6, "auroc": 0.7,
    ...                        "f1_per_class": [0.4, 0.6]},
    ...                       {"macro_f1": 0.7, "accuracy": 0.8, "auroc": 0.9,
    ...                        "f1_per_class": [0.6, 0.8]}])
    >>> round(s["macro_f1"], 3), round(s["macro_f1_sd"], 3), s["f1_per_class"]
    (0.6, 0.141, [0.5, 0.7])
    """
    summary: dict[str, Any] = {"splits": {}}
    for name in SPLIT_SCORES:
        values = np.array([split[name] for split in per_split], dtype=np.float64)
        summary["splits"][name] = values.tolist()
        known = values[~np.isnan(values)]
        summary[name] = float(known.mean()) if known.size else float("nan")
        summary[f"{name}_sd"] = float(known.std(ddof=1)) if known.size > 1 else float("nan")
    per_class = np.array([split["f1_per_class"] for split in per_split], dtype=np.float64)
    summary["splits"]["f1_per_class"] = per_class
    summary["f1_per_class"] = per_class.mean(axis=0).tolist()
    return summary
