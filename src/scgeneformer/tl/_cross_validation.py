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
from ..train._history import Records, history_frames, merge_histories, tag_records
from ._finetune_cells import (
    attach_cell_results,
    cell_baseline,
    cell_inputs,
    predict_cells,
    train_cells,
)
from ._labels import check_class_sizes
from ._metrics import classification_scores, summarise_splits
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
    inputs = cell_inputs(adata, model, label_key, group_key)
    codes, classes, groups, _, n_tokens, usable = inputs
    if groups is None:
        check_class_sizes(
            codes[usable],
            classes,
            f"obs[{label_key!r}]",
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
    splits = [
        (usable[fold_of_usable == index], usable[val_of_usable[index]]) for index in range(n_splits)
    ]
    runs = _SplitRuns.run(adata, model, inputs, splits, label_key, patience, baseline, options)
    result: dict[str, Any] = {
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "classes": classes,
        "n_splits": n_splits,
        **runs.summary(codes[usable], usable, classes, n_tokens),
        "params": options.params(n_splits=n_splits, val_size=float(val_size), patience=patience),
    }
    if groups is not None:
        result["test_groups"] = [", ".join(sorted(set(groups[test]))) for test, _ in splits]
    summary = f"finetune: {n_splits}-split macro-F1 {_format(result)}"
    if baseline:
        result["baseline"] = {
            "method": runs.baseline_splits[0]["method"],
            **summarise_splits(runs.baseline_splits),
        }
        summary += f"; PCA + logistic regression {_format(result['baseline'])}"
    logger.info(summary + " (mean ± SD over splits).")

    final_options = dataclasses.replace(options, random_state=options.random_state + n_splits)
    final, final_history = _fit_on_all(model, inputs, label_key, val_size, patience, final_options)
    attach_cell_results(
        adata,
        key,
        final,
        final_history,
        runs.oof,
        result,
        cv_macro_f1=result["macro_f1"],
        cv_macro_f1_sd=result["macro_f1_sd"],
        cv_accuracy=result["accuracy"],
    )
    fold = np.full(len(n_tokens), -1, dtype=np.int64)
    fold[usable] = fold_of_usable
    adata.obs[f"{key}_fold"] = fold
    return final


@dataclasses.dataclass
class _SplitRuns:
    """What the classifiers of the splits gave: out-of-split probabilities and scores."""

    oof: np.ndarray  # cells x classes, each cell predicted by the split that held it out
    model_splits: list[dict[str, Any]]
    baseline_splits: list[dict[str, Any]]
    histories: list[Records]
    sizes: dict[str, list[int]]

    @classmethod
    def run(
        cls,
        adata: AnnData,
        model: Geneformer,
        inputs: tuple,
        splits: list[tuple[np.ndarray, np.ndarray]],
        label_key: str,
        patience: int | None,
        baseline: bool,
        options: FitOptions,
    ) -> _SplitRuns:
        """Train on each split's cells outside ``(test, val)``, stopped on ``val``."""
        codes, classes, _, tokens, n_tokens, usable = inputs
        runs = cls(np.full((adata.n_obs, len(classes)), np.nan, dtype=np.float32), [], [], [], {})
        runs.sizes = {"train": [], "val": [], "test": []}
        n_splits = len(splits)
        for index, (test, val) in enumerate(splits):
            train = np.setdiff1d(np.setdiff1d(usable, test), val)
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
            runs.histories.append(tag_records(history, split=index))
            runs.oof[test] = predict_cells(clf, tokens, n_tokens, test, options, progress=False)
            scores = classification_scores(codes[test], runs.oof[test])
            runs.model_splits.append(scores)
            for name, cells in (("train", train), ("val", val), ("test", test)):
                runs.sizes[name].append(len(cells))
            message = f"split {index + 1}/{n_splits}: test macro-F1 {scores['macro_f1']:.3f}"
            if baseline:
                fit_cells = np.concatenate([train, val])
                runs.baseline_splits.append(cell_baseline(adata, codes, fit_cells, test, options))
                message += f"; PCA + logistic regression {runs.baseline_splits[-1]['macro_f1']:.3f}"
            logger.info(message)
        return runs

    def summary(
        self, usable_codes: np.ndarray, usable: np.ndarray, classes: list, n_tokens: np.ndarray
    ) -> dict[str, Any]:
        """Mean and SD over splits, pooled scores and cell counts, for ``uns``."""
        pooled = classification_scores(usable_codes, self.oof[usable])
        return {
            **summarise_splits(self.model_splits),
            "pooled": {k: v for k, v in pooled.items() if k != "confusion"},
            "confusion_matrix": {"labels": classes, "counts": pooled["confusion"]},
            "n_cells": {**self.sizes, "without_tokens": len(n_tokens) - len(usable)},
            "history": history_frames(merge_histories(self.histories)),
        }


def _fit_on_all(
    model: Geneformer,
    inputs: tuple,
    label_key: str,
    val_size: float,
    patience: int | None,
    options: FitOptions,
) -> tuple[GeneformerClassifier, Records]:
    """Train the classifier handed back on every cell; its validation part only stops it.

    ``options.random_state`` is the final fit's own seed (the splits use the ones before it).
    """
    codes, classes, groups, tokens, n_tokens, usable = inputs
    final_val = usable[:0]
    if val_size > 0:
        rng = np.random.default_rng(options.random_state)
        held = validation_holdout(
            codes[usable], None if groups is None else groups[usable], val_size, rng
        )
        final_val = usable[held]
    return train_cells(
        model,
        tokens,
        n_tokens,
        codes,
        classes,
        np.setdiff1d(usable, final_val),
        final_val,
        options,
        label_key=label_key,
        patience=patience,
        desc="final fit",
    )
