"""The cell task of ``tl.finetune``: split the cells, train, score beside the baseline."""

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
from .._slots import counts_layer
from ..model import Geneformer
from ..model._classifier import GeneformerClassifier
from ..train._finetune_loop import FitOptions, fit_classifier
from ..train._history import history_frames
from ..train._optim import seed_everything
from ._baseline import pca_logreg_baseline
from ._finetune_common import classification_metrics, new_classifier
from ._labels import cell_groups, check_class_sizes, class_weights, encode_labels, obs_column
from ._predict import cell_proba, write_cell_predictions
from ._splits import SPLITS, split_cells
from ._tokens import cell_tokens

logger = logging.getLogger(__name__)

_CELLS_REASON = "cells to have one in training and one in testing"


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
            stacklevel=3,
        )
        check_class_sizes(codes[usable], classes, f"{where} (cells with tokens)", 2, _CELLS_REASON)
    split = np.full(len(n_tokens), None, dtype=object)
    split[usable] = split_cells(
        codes[usable],
        None if groups is None else groups[usable],
        test_size=test_size,
        val_size=val_size,
        random_state=options.random_state,
    )
    part = {name: np.flatnonzero(split == name) for name in SPLITS}
    device, dtype = options.device, options.dtype
    eval_budget = options.eval_budget

    seed = options.random_state
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    clf = new_classifier(
        model,
        classes,
        task="cell",
        label_key=label_key,
        freeze_layers=options.freeze_layers,
        random_state=seed,
    )
    weights = class_weights(codes[part["train"]], len(classes), options.class_weight)
    targets = torch.as_tensor(codes, device=device)
    weight_t = torch.as_tensor(weights, device=device)

    def loss_fn(batch: np.ndarray, logits: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets[torch.as_tensor(batch, device=device)], weight_t)

    def evaluate() -> tuple[float, float]:
        from sklearn.metrics import f1_score

        val = part["val"]
        proba = cell_proba(
            clf,
            tokens[val],
            n_tokens[val],
            budget=eval_budget,
            device=device,
            dtype=dtype,
            progress=False,
        )
        truth = codes[val]
        nll = -np.log(np.clip(proba[np.arange(len(val)), truth], 1e-12, None)).mean()
        macro_f1 = f1_score(truth, proba.argmax(axis=1), average="macro", zero_division=0)
        return float(nll), float(macro_f1)

    history = fit_classifier(
        clf,
        tokens,
        n_tokens,
        part["train"],
        loss_fn,
        options,
        rng=rng,
        evaluate=evaluate if len(part["val"]) else None,
        patience=patience if len(part["val"]) else None,
        desc="finetune",
    )
    test = part["test"]
    test_proba = cell_proba(
        clf,
        tokens[test],
        n_tokens[test],
        budget=eval_budget,
        device=device,
        dtype=dtype,
        progress=settings.progress,
    )
    scores = classification_metrics(codes[test], test_proba.argmax(axis=1), len(classes))
    result: dict[str, Any] = {
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "classes": classes,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
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
        fitted = pca_logreg_baseline(
            adata,
            codes,
            np.concatenate([part["train"], part["val"]]),
            test,
            layer=counts_layer(adata),
            class_weight=options.class_weight,
            random_state=options.random_state,
        )
        result["baseline"] = fitted
        logger.info(
            f"finetune: test macro-F1 {scores['macro_f1']:.3f} (accuracy "
            f"{scores['accuracy']:.3f}); PCA + logistic regression {fitted['macro_f1']:.3f} "
            f"({fitted['accuracy']:.3f})."
        )

    proba = np.full((adata.n_obs, len(classes)), np.nan, dtype=np.float32)
    proba[test] = test_proba
    write_cell_predictions(adata, key, classes, proba)
    adata.obs[f"{key}_split"] = pd.Categorical(split, categories=list(SPLITS))
    adata.uns[f"{key}_finetune"] = result
    clf.history = history
    clf.training_args = {
        **result["params"],
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "test_accuracy": scores["accuracy"],
        "test_macro_f1": scores["macro_f1"],
    }
    return clf
