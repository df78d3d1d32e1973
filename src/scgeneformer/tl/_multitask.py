"""``tl.finetune(label_key=[...])``: one encoder, one head per label column, trained together.

One column reduces exactly to the single task of :mod:`._finetune_cells`: the same split, the
same seeds drawn in the same order, the same head initialisation (the heads are row blocks of
one linear layer, :mod:`scgeneformer.model._multitask`), the same loss call (weight 1.0) and
the same validation score (a mean over one task), so the predictions are equal bit for bit.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData

from .._settings import settings
from ..model import Geneformer
from ..model._multitask import MultitaskClassifier
from ..train._finetune_loop import FitOptions, LossFn, fit_classifier
from ..train._history import Records, history_frames
from ..train._optim import seed_everything
from ._finetune_cells import cell_baseline, predict_cells
from ._finetune_common import prepared_for_training
from ._labels import cell_groups, check_class_sizes, class_weights
from ._metrics import classification_scores, validation_scores
from ._predict import write_task_predictions
from ._splits import SPLITS, split_cells
from ._task_labels import UNLABELLED, TaskLabels, TaskWeights, resolve_task_weights, task_labels
from ._task_slots import TaskKeys, check_task_keys, task_columns, task_keys
from ._tokens import cell_tokens

logger = logging.getLogger(__name__)

_CELLS_REASON = "labelled cells to have one in training and one in testing"


def multitask_inputs(
    adata: AnnData, model: Geneformer, columns: list[str], group_key: str | None
) -> tuple[TaskLabels, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """Check and return labels, groups, tokens, token counts and the cells to split."""
    labels = task_labels(adata, columns)
    for column in columns:
        check_class_sizes(
            labels.codes[column][labels.labelled(column)],
            labels.classes[column],
            f"obs[{column!r}]",
            2,
            _CELLS_REASON,
        )
    groups = cell_groups(adata, group_key)
    tokens, n_tokens = cell_tokens(adata, model)
    has_tokens, labelled = n_tokens > 0, labels.any_labelled()
    for mask, what in ((~has_tokens, "have no tokens"), (has_tokens & ~labelled, "have no label")):
        if mask.any():
            warnings.warn(
                f"{int(mask.sum()):,} cells {what}; they are left out of training and testing "
                "(no split, no prediction).",
                UserWarning,
                stacklevel=5,
            )
    usable = np.flatnonzero(has_tokens & labelled)
    for column in columns:
        codes = labels.codes[column][labels.labelled(column, usable)]
        where = f"obs[{column!r}] (cells with tokens)"
        check_class_sizes(codes, labels.classes[column], where, 2, _CELLS_REASON)
    return labels, groups, tokens, n_tokens, usable


def task_loss(
    clf: MultitaskClassifier,
    labels: TaskLabels,
    weights: dict[str, float],
    train: np.ndarray,
    options: FitOptions,
) -> LossFn:
    """Return the training loss: the weighted sum of each task's class-weighted cross-entropy.

    A task's cross-entropy is the (class-weighted) mean over the batch's cells labelled in it;
    the others carry :data:`UNLABELLED`, cross-entropy's ``ignore_index``. A batch without a
    cell labelled in a task has no term for it (its mean would be 0 / 0).
    """
    device = options.device
    targets = {c: torch.as_tensor(labels.codes[c], device=device) for c in labels.columns}
    class_w = {
        c: torch.as_tensor(
            class_weights(
                labels.codes[c][labels.labelled(c, train)],
                len(labels.classes[c]),
                options.class_weight,
            ),
            device=device,
        )
        for c in labels.columns
    }

    def loss_fn(batch: np.ndarray, logits: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(batch, device=device)
        total = None
        for column, block in clf.split_logits(logits).items():
            if not len(labels.labelled(column, batch)):  # decided on the host: no device sync
                continue
            term = weights[column] * F.cross_entropy(block, targets[column][rows], class_w[column])
            total = term if total is None else total + term
        return total  # every training cell is labelled in some task

    return loss_fn


def train_tasks(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    labels: TaskLabels,
    weights: dict[str, float],
    train: np.ndarray,
    val: np.ndarray,
    options: FitOptions,
    *,
    patience: int | None,
    desc: str,
) -> tuple[MultitaskClassifier, dict[str, Records]]:
    """Train a new multitask classifier on ``train``, early-stopped on ``val``.

    The validation score is the mean over tasks of macro-F1 (ties broken by the mean NLL),
    each over the validation cells labelled in that task.
    """
    seed = options.random_state
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    clf = MultitaskClassifier.from_encoder(model, labels.classes, random_state=seed)
    clf = prepared_for_training(clf, options)

    def evaluate() -> tuple[float, float]:
        proba = predict_cells(clf, tokens, n_tokens, val, options, progress=False)
        scores = []
        for column, block in task_columns(proba, labels.classes).items():
            truth = labels.codes[column][val]
            held = truth != UNLABELLED
            if held.any():
                scores.append(validation_scores(truth[held], block[held]))
        nll, macro_f1 = np.mean(scores, axis=0)
        return float(nll), float(macro_f1)

    history = fit_classifier(
        clf,
        tokens,
        n_tokens,
        train,
        task_loss(clf, labels, weights, train, options),
        options,
        rng=rng,
        evaluate=evaluate if len(val) else None,
        patience=patience if len(val) else None,
        desc=desc,
    )
    return clf, history


def score_task(
    adata: AnnData,
    column: str,
    labels: TaskLabels,
    proba: np.ndarray,
    part: dict[str, np.ndarray],
    *,
    baseline: bool,
    options: FitOptions,
) -> dict[str, Any]:
    """One task's test scores (over its labelled test cells), beside its baseline."""
    codes, classes = labels.codes[column], labels.classes[column]
    cells = {name: labels.labelled(column, part[name]) for name in SPLITS}
    result: dict[str, Any] = {
        "classes": classes,
        "n_cells": {name: len(c) for name, c in cells.items()},
    }
    test, fit = cells["test"], np.concatenate([cells["train"], cells["val"]])
    if not len(test):
        warnings.warn(
            f"No test cell has a label in obs[{column!r}]; that task is not scored (the split "
            f"is stratified on obs[{labels.columns[0]!r}]).",
            UserWarning,
            stacklevel=4,
        )
        return {**result, "accuracy": np.nan, "macro_f1": np.nan}
    scores = classification_scores(codes[test], proba[test])
    result.update(
        accuracy=scores["accuracy"],
        macro_f1=scores["macro_f1"],
        f1_per_class=scores["f1_per_class"],
        auroc=scores["auroc"],
        confusion_matrix={"labels": classes, "counts": scores["confusion"]},
    )
    message = f"finetune {column}: test macro-F1 {scores['macro_f1']:.3f}"
    if baseline and len(np.unique(codes[fit])) > 1:
        result["baseline"] = cell_baseline(adata, codes, fit, test, options)
        message += f"; PCA + logistic regression {result['baseline']['macro_f1']:.3f}"
    logger.info(message + ".")
    return result


def warn_untrained_classes(labels: TaskLabels, train: np.ndarray) -> None:
    """Warn about classes of later tasks that the split left without a training cell."""
    for column in labels.columns[1:]:
        classes = labels.classes[column]
        trained = labels.codes[column][labels.labelled(column, train)]
        absent = [
            classes[i] for i in np.flatnonzero(np.bincount(trained, minlength=len(classes)) == 0)
        ]
        if absent:
            warnings.warn(
                f"Classes {absent} of obs[{column!r}] have no training cell: the split is "
                f"stratified on obs[{labels.columns[0]!r}], the first label column. Put the "
                "column with the rarest classes first.",
                UserWarning,
                stacklevel=4,
            )


def finetune_multitask(
    adata: AnnData,
    model: Geneformer,
    *,
    columns: list[str],
    key_added: str | None,
    task_weights: TaskWeights,
    group_key: str | None,
    test_size: float,
    val_size: float,
    patience: int | None,
    baseline: bool,
    options: FitOptions,
) -> MultitaskClassifier:
    """Run :func:`scgeneformer.tl.finetune` with ``label_key`` a list (it lists the slots)."""
    keys = task_keys(columns, key_added)
    check_task_keys(keys, tool="tl.finetune", uns_suffix="finetune", reads=[*columns, group_key])
    labels, groups, tokens, n_tokens, usable = multitask_inputs(adata, model, columns, group_key)
    split = np.full(len(n_tokens), None, dtype=object)
    split[usable] = split_cells(
        labels.strata()[usable],
        None if groups is None else groups[usable],
        test_size=test_size,
        val_size=val_size,
        random_state=options.random_state,
    )
    part = {name: np.flatnonzero(split == name) for name in SPLITS}
    warn_untrained_classes(labels, part["train"])
    weights = resolve_task_weights(task_weights, labels, part["train"])
    clf, history = train_tasks(
        model,
        tokens,
        n_tokens,
        labels,
        weights,
        part["train"],
        part["val"],
        options,
        patience=patience,
        desc="finetune",
    )
    proba = np.full((adata.n_obs, clf.n_classes), np.nan, dtype=np.float32)
    proba[part["test"]] = predict_cells(
        clf, tokens, n_tokens, part["test"], options, progress=settings.progress
    )
    tasks = {
        column: score_task(adata, column, labels, block, part, baseline=baseline, options=options)
        for column, block in task_columns(proba, labels.classes).items()
    }
    result: dict[str, Any] = {
        "task": "cell",
        "label_key": columns,
        "group_key": group_key,
        "tasks": tasks,
        "task_weights": weights,
        "macro_f1": float(np.nanmean([t["macro_f1"] for t in tasks.values()])),
        "accuracy": float(np.nanmean([t["accuracy"] for t in tasks.values()])),
        "n_cells": {
            **{name: len(cells) for name, cells in part.items()},
            "without_tokens": int((n_tokens == 0).sum()),
            "unlabelled": int(((n_tokens > 0) & ~labels.any_labelled()).sum()),
        },
        "history": history_frames(history),
        "params": options.params(
            test_size=float(test_size), val_size=float(val_size), patience=patience
        ),
    }
    if groups is not None:
        result["groups"] = {name: sorted(set(groups[cells])) for name, cells in part.items()}
    attach_task_results(adata, keys, clf, history, proba, result)
    adata.obs[f"{keys.shared}_split"] = pd.Categorical(split, categories=list(SPLITS))
    return clf


def attach_task_results(
    adata: AnnData,
    keys: TaskKeys,
    clf: MultitaskClassifier,
    history: Records,
    proba: np.ndarray,
    result: dict[str, Any],
) -> None:
    """Write each task's predictions and the ``uns`` summary; give ``clf`` history and args."""
    write_task_predictions(adata, keys.prefixes, clf.tasks, proba)
    adata.uns[f"{keys.shared}_finetune"] = result
    clf.history = history
    clf.training_args = {
        **result["params"],
        "task": "cell",
        "label_key": result["label_key"],
        "group_key": result["group_key"],
        "task_weights": result["task_weights"],
        "test_macro_f1": result["macro_f1"],
        "test_accuracy": result["accuracy"],
        "test_macro_f1_per_task": {c: t["macro_f1"] for c, t in result["tasks"].items()},
    }
