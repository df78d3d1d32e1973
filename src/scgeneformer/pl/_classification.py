"""Plots of classification results: the confusion matrix of true and predicted classes."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

from .._docs import doc_params, doc_plot_output
from ._utils import finish, new_axes


@doc_params(plot_output=doc_plot_output)
def confusion_matrix(
    adata: AnnData,
    label_key: str,
    *,
    pred_key: str | None = None,
    normalize: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Heatmap of true classes (rows) against predicted classes (columns).

    Counts the cells that have both a label in ``obs[label_key]`` and a prediction in
    ``obs[pred_key]``: after :func:`scgeneformer.tl.finetune` these are the held-out test
    cells; after :func:`scgeneformer.tl.predict` on labelled cells, all of them.

    Parameters
    ----------
    adata
        Cells with labels and predictions.
    label_key
        ``obs`` column of the true labels.
    pred_key
        ``obs`` column of the predictions; default ``f"{label_key}_pred"``.
    normalize
        Show each true class's row as fractions (recall on the diagonal) instead of counts.
    {plot_output}

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.tl.finetune(adata, model, label_key="cell_type")  # doctest: +SKIP
    >>> ax = sgf.pl.confusion_matrix(adata, "cell_type", show=False)  # doctest: +SKIP
    """
    import seaborn as sns

    pred_key = pred_key or f"{label_key}_pred"
    missing = [k for k in (label_key, pred_key) if k not in adata.obs.columns]
    if missing:
        raise ValueError(
            f"adata.obs has no column(s) {missing}; run sgf.tl.finetune or sgf.tl.predict first "
            f"(the columns are {list(adata.obs.columns)})."
        )
    truth, pred = adata.obs[label_key], adata.obs[pred_key]
    both = truth.notna().to_numpy() & pred.notna().to_numpy()
    if not both.any():
        raise ValueError(f"No cell has both a label in {label_key!r} and a prediction.")
    truth, pred = truth[both].astype(str), pred[both].astype(str)
    table = pd.crosstab(truth, pred)
    classes = _class_order(adata.obs[label_key], adata.obs[pred_key], table)
    table = table.reindex(index=classes, columns=classes, fill_value=0)
    if normalize:
        rows = table.sum(axis=1).replace(0, np.nan)
        table = table.div(rows, axis=0).fillna(0.0)

    size = 1.0 + 0.55 * len(classes)
    ax = new_axes(ax, (size + 1.5, size))
    sns.heatmap(
        table,
        annot=len(classes) <= 20,
        fmt=".2f" if normalize else "d",
        cmap="Blues",
        vmin=0,
        vmax=1 if normalize else None,
        square=True,
        cbar_kws={"label": "fraction of true class" if normalize else "cells"},
        ax=ax,
    )
    ax.set_xlabel(f"predicted ({pred_key})")
    ax.set_ylabel(f"true ({label_key})")
    ax.set_title("confusion matrix" + (", row-normalised" if normalize else ""))
    return finish(ax, show, save)


def _class_order(truth: pd.Series, pred: pd.Series, table: pd.DataFrame) -> list[str]:
    """Categories of the predictions (the classifier's order), then any other labels seen."""
    order: list[str] = []
    for series in (pred, truth):
        if isinstance(series.dtype, pd.CategoricalDtype):
            order += [str(c) for c in series.cat.categories]
    order += [str(c) for c in (*table.index, *table.columns)]
    return list(dict.fromkeys(order))
