"""The cell task of ``tl.finetune``: split the cells, train, score beside the baseline."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData

from .._settings import settings
from .._slots import counts_layer
from ..model import Geneformer
from ..model._classifier import GeneformerClassifier
from ..train._finetune_loop import FitOptions, fit_classifier
from ..train._history import Records, history_frames
from ..train._optim import seed_everything
from ._baseline import pca_logreg_baseline
from ._finetune_common import new_classifier
from ._labels import cell_groups, check_class_sizes, class_weights, encode_labels, obs_column
from ._metrics import classification_scores, validation_scores
from ._predict import cell_proba, write_cell_predictions
from ._splits import SPLITS, split_cells
from ._tokens import cell_tokens

logger = logging.getLogger(__name__)

_CELLS_REASON = "cells to have one in training and one in testing"


def cell_inputs(
    adata: AnnData, model: Geneformer, label_key: str, group_key: str | None
) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """Check and return labels, classes, groups, tokens, token counts and the cells with tokens."""
    where = f"obs[{label_key!r}]"
    codes, classes = encode_labels(
        obs_column(adata, label_key, "label_key"),
        where,
        f"drop those cells first, e.g. adata = adata[adata.obs[{label_key!r}].notna()].copy()",
    )
    check_class_sizes(codes, classes, where, 2, _CELLS_REASON)
    groups = cell_groups(adata, group_key)
    tokens, n_tokens = cell_tokens(adata, model)
    usable = np.flatnonzero(n_tokens > 0)
    if len(usable) < len(n_tokens):
        warnings.warn(
            f"{len(n_tokens) - len(usable):,} cells have no tokens; they are left out of "
            "training and testing (no split, no prediction).",
            UserWarning,
            stacklevel=4,
        )
        check_class_sizes(codes[usable], classes, f"{where} (cells with tokens)", 2, _CELLS_REASON)
    return codes, classes, groups, tokens, n_tokens, usable


def predict_cells(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    cells: np.ndarray,
    options: FitOptions,
    *,
    progress: bool,
) -> np.ndarray:
    """Class probabilities of the cells ``cells`` (rows in that order)."""
    return cell_proba(
        clf,
        tokens[cells],
        n_tokens[cells],
        budget=options.eval_budget,
        device=options.device,
        dtype=options.dtype,
        progress=progress,
    )


def train_cells(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    codes: np.ndarray,
    classes: list[str],
    train: np.ndarray,
    val: np.ndarray,
    options: FitOptions,
    *,
    label_key: str,
    patience: int | None,
    desc: str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[GeneformerClassifier, dict[str, Records]]:
    """Train a new cell classifier on the cells ``train``, early-stopped on ``val``."""
    device = options.device
    seed = options.random_state
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    clf = new_classifier(
        model,
        classes,
        task="cell",
        label_key=label_key,
        options=options,
        random_state=seed,
    )
    weights = class_weights(codes[train], len(classes), options.class_weight)
    targets = torch.as_tensor(codes, device=device)
    weight_t = torch.as_tensor(weights, device=device)

    def loss_fn(batch: np.ndarray, logits: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets[torch.as_tensor(batch, device=device)], weight_t)

    def evaluate() -> tuple[float, float]:
        proba = predict_cells(clf, tokens, n_tokens, val, options, progress=False)
        return validation_scores(codes[val], proba)

    history = fit_classifier(
        clf,
        tokens,
        n_tokens,
        train,
        loss_fn,
        options,
        rng=rng,
        evaluate=evaluate if len(val) else None,
        patience=patience if len(val) else None,
        desc=desc,
        on_epoch=on_epoch,
    )
    return clf, history


def cell_baseline(
    adata: AnnData,
    codes: np.ndarray,
    fit_cells: np.ndarray,
    test_cells: np.ndarray,
    options: FitOptions,
) -> dict[str, Any]:
    """PCA + logistic regression on the counts the cells were tokenized from."""
    return pca_logreg_baseline(
        adata,
        codes,
        fit_cells,
        test_cells,
        layer=counts_layer(adata),
        class_weight=options.class_weight,
        random_state=options.random_state,
    )


def finetune_cells(
    adata: AnnData,
    model: Geneformer,
    *,
    label_key: str,
    key: str,
    group_key: str | None,
    test_size: float,
    val_size: float,
    patience: int | None,
    baseline: bool,
    options: FitOptions,
) -> GeneformerClassifier:
    """Run the cell task of :func:`scgeneformer.tl.finetune` (which lists the slots written)."""
    codes, classes, groups, tokens, n_tokens, usable = cell_inputs(
        adata, model, label_key, group_key
    )
    split = np.full(len(n_tokens), None, dtype=object)
    split[usable] = split_cells(
        codes[usable],
        None if groups is None else groups[usable],
        test_size=test_size,
        val_size=val_size,
        random_state=options.random_state,
    )
    part = {name: np.flatnonzero(split == name) for name in SPLITS}
    clf, history = train_cells(
        model,
        tokens,
        n_tokens,
        codes,
        classes,
        part["train"],
        part["val"],
        options,
        label_key=label_key,
        patience=patience,
        desc="finetune",
    )
    test = part["test"]
    test_proba = predict_cells(clf, tokens, n_tokens, test, options, progress=settings.progress)
    scores = classification_scores(codes[test], test_proba)
    result: dict[str, Any] = {
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "classes": classes,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "f1_per_class": scores["f1_per_class"],
        "auroc": scores["auroc"],
        "confusion_matrix": {"labels": classes, "counts": scores["confusion"]},
        "n_cells": {
            **{name: len(cells) for name, cells in part.items()},
            "without_tokens": len(n_tokens) - len(usable),
        },
        "history": history_frames(history),
        "params": options.params(
            test_size=float(test_size), val_size=float(val_size), patience=patience
        ),
    }
    if groups is not None:
        result["groups"] = {name: sorted(set(groups[cells])) for name, cells in part.items()}
    if baseline:
        fitted = cell_baseline(
            adata, codes, np.concatenate([part["train"], part["val"]]), test, options
        )
        result["baseline"] = fitted
        logger.info(
            f"finetune: test macro-F1 {scores['macro_f1']:.3f} (accuracy "
            f"{scores['accuracy']:.3f}); PCA + logistic regression {fitted['macro_f1']:.3f} "
            f"({fitted['accuracy']:.3f})."
        )

    proba = np.full((adata.n_obs, len(classes)), np.nan, dtype=np.float32)
    proba[test] = test_proba
    attach_cell_results(
        adata,
        key,
        clf,
        history,
        proba,
        result,
        test_accuracy=scores["accuracy"],
        test_macro_f1=scores["macro_f1"],
    )
    adata.obs[f"{key}_split"] = pd.Categorical(split, categories=list(SPLITS))
    return clf


def attach_cell_results(
    adata: AnnData,
    key: str,
    clf: GeneformerClassifier,
    history: Records,
    proba: np.ndarray,
    result: dict[str, Any],
    **scores: float,
) -> None:
    """Write a cell task's predictions and ``uns`` summary; give ``clf`` its history and args.

    ``result`` is the ``uns[f"{key}_finetune"]`` summary (with ``params``, ``label_key``,
    ``group_key`` and ``classes``); ``scores`` are added to the classifier's training args.
    """
    write_cell_predictions(adata, key, result["classes"], proba)
    adata.uns[f"{key}_finetune"] = result
    clf.history = history
    clf.training_args = {
        **result["params"],
        "task": "cell",
        "label_key": result["label_key"],
        "group_key": result["group_key"],
        **scores,
    }
