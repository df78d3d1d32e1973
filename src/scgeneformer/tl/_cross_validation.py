"""``tl.finetune(..., n_splits=k)`` for cells: k-fold cross-validation beside the baseline."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from anndata import AnnData

from ..model import Geneformer
from ..model._classifier import GeneformerClassifier
from ..train._finetune_loop import FitOptions
from ..train._history import history_frames, merge_histories, tag_records
from ._finetune_cells import cell_baseline, cell_inputs, predict_cells, train_cells
from ._labels import check_class_sizes
from ._metrics import classification_scores, summarise_splits
from ._predict import write_cell_predictions
from ._splits import cv_splits, validation_holdout

logger = logging.getLogger(__name__)


def _format(summary: dict[str, Any]) -> str:
    return f"{summary['macro_f1']:.3f} ± {summary['macro_f1_sd']:.3f}"


def cross_validate_cells(
    adata: AnnData,
    model: Geneformer,
    *,
    label_key: str,
    key: str,
    group_key: str | None,
    n_splits: int,
    val_size: float,
    patience: int | None,
    baseline: bool,
    options: FitOptions,
) -> GeneformerClassifier:
    """Train and score one classifier per split, then one on all cells (the one returned).

    See :func:`~scgeneformer.tl.finetune` (``n_splits``) for what it writes.
    """
    codes, classes, groups, tokens, n_tokens, usable = cell_inputs(
        adata, model, label_key, group_key
    )
    where = f"obs[{label_key!r}]"
    if groups is None:
        check_class_sizes(
            codes[usable],
            classes,
            where,
            n_splits,
            f"cells to have one in each of the n_splits={n_splits} test folds (lower n_splits)",
        )
    fold_of_usable, val_of_usable = cv_splits(
        codes[usable],
        None if groups is None else groups[usable],
        n_splits,
        val_size=val_size,
        random_state=options.random_state,
    )
    fold = np.full(len(n_tokens), -1, dtype=np.int64)
    fold[usable] = fold_of_usable
    oof = np.full((adata.n_obs, len(classes)), np.nan, dtype=np.float32)
    model_splits, baseline_splits, histories = [], [], []
    sizes: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    test_groups = []
    for index in range(n_splits):
        test = usable[fold_of_usable == index]
        val = usable[val_of_usable[index]]
        train = np.setdiff1d(usable[fold_of_usable != index], val)
        split_options = dataclasses.replace(options, random_state=options.random_state + index)
        clf, history = train_cells(
            model,
            tokens,
            n_tokens,
            codes,
            classes,
            train,
            val,
            split_options,
            label_key=label_key,
            patience=patience,
            desc=f"split {index + 1}/{n_splits}",
        )
        histories.append(tag_records(history, split=index))
        oof[test] = predict_cells(clf, tokens, n_tokens, test, options, progress=False)
        scores = classification_scores(codes[test], oof[test])
        model_splits.append(scores)
        for name, cells in (("train", train), ("val", val), ("test", test)):
            sizes[name].append(len(cells))
        if groups is not None:
            test_groups.append(", ".join(sorted(set(groups[test]))))
        message = f"split {index + 1}/{n_splits}: test macro-F1 {scores['macro_f1']:.3f}"
        if baseline:
            fit_cells = np.concatenate([train, val])
            baseline_splits.append(cell_baseline(adata, codes, fit_cells, test, options))
            message += f"; PCA + logistic regression {baseline_splits[-1]['macro_f1']:.3f}"
        logger.info(message)

    pooled = classification_scores(codes[usable], oof[usable])
    result: dict[str, Any] = {
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "classes": classes,
        "n_splits": n_splits,
        **summarise_splits(model_splits),
        "pooled": {k: v for k, v in pooled.items() if k != "confusion"},
        "confusion_matrix": {"labels": classes, "counts": pooled["confusion"]},
        "n_cells": {**sizes, "without_tokens": len(n_tokens) - len(usable)},
        "history": history_frames(merge_histories(histories)),
        "params": options.params(n_splits=n_splits, val_size=float(val_size), patience=patience),
    }
    if groups is not None:
        result["test_groups"] = test_groups
    summary = f"finetune: {n_splits}-split macro-F1 {_format(result)}"
    if baseline:
        result["baseline"] = {
            "method": baseline_splits[0]["method"],
            **summarise_splits(baseline_splits),
        }
        summary += f"; PCA + logistic regression {_format(result['baseline'])}"
    logger.info(summary + " (mean ± SD over splits).")

    # The classifier handed back learns from every cell; its validation part only stops it.
    final_options = dataclasses.replace(options, random_state=options.random_state + n_splits)
    rng = np.random.default_rng(final_options.random_state)
    final_val = usable[:0]
    if val_size > 0:
        held = validation_holdout(
            codes[usable], None if groups is None else groups[usable], val_size, rng
        )
        final_val = usable[held]
    final, final_history = train_cells(
        model,
        tokens,
        n_tokens,
        codes,
        classes,
        np.setdiff1d(usable, final_val),
        final_val,
        final_options,
        label_key=label_key,
        patience=patience,
        desc="final fit",
    )
    write_cell_predictions(adata, key, classes, oof)
    adata.obs[f"{key}_fold"] = fold
    adata.uns[f"{key}_finetune"] = result
    final.history = final_history
    final.training_args = {
        **result["params"],
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "cv_macro_f1": result["macro_f1"],
        "cv_macro_f1_sd": result["macro_f1_sd"],
        "cv_accuracy": result["accuracy"],
    }
    return final
