"""Plot of cross-validated fine-tuning: each split's score, the model beside the baseline."""

from __future__ import annotations

import os

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from .._docs import doc_params, doc_plot_output
from ..tl._metrics import SPLIT_SCORES
from ._utils import finish, new_axes, stored_result

_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "auroc": "AUROC"}


@doc_params(plot_output=doc_plot_output)
def finetune_splits(
    adata: AnnData,
    key: str,
    *,
    metric: str = "macro_f1",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Each cross-validation split's test score, Geneformer beside the baseline.

    One point per split and method, a line joining the two scores of the same split (they
    share their test cells), and the mean ± SD over splits as a bar with error whiskers.

    Parameters
    ----------
    adata
        Cells after :func:`scgeneformer.tl.finetune` with ``n_splits >= 2``.
    key
        The ``key_added`` (default the ``label_key``) of that run.
    metric
        ``"macro_f1"``, ``"accuracy"`` or ``"auroc"``.
    {plot_output}

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.tl.finetune(adata, model, label_key="state", n_splits=5)  # doctest: +SKIP
    >>> ax = sgf.pl.finetune_splits(adata, "state", show=False)  # doctest: +SKIP
    """
    if metric not in SPLIT_SCORES:
        raise ValueError(f"metric must be one of {list(SPLIT_SCORES)}, got {metric!r}.")
    result = stored_result(
        adata,
        f"{key}_finetune",
        ("splits", "n_splits"),
        f"sgf.tl.finetune(adata, model, label_key={key!r}, n_splits=5)",
    )
    methods = {"Geneformer": result}
    if "baseline" in result:
        methods["PCA + logistic regression"] = result["baseline"]
    scores = np.array([np.asarray(m["splits"][metric], dtype=float) for m in methods.values()])
    ax = new_axes(ax, (1.6 + 1.4 * len(methods), 3.6))
    x = np.arange(len(methods))
    means = np.array([m[metric] for m in methods.values()])
    sds = np.nan_to_num([m[f"{metric}_sd"] for m in methods.values()])
    ax.bar(x, means, width=0.55, color=["#4c72b0", "#aaaaaa"][: len(methods)], alpha=0.35)
    ax.errorbar(x, means, yerr=sds, fmt="none", ecolor="black", capsize=6, lw=1.2)
    jitter = np.linspace(-0.12, 0.12, scores.shape[1])
    for split in range(scores.shape[1]):
        ax.plot(x + jitter[split], scores[:, split], "o-", color="black", ms=4, lw=0.6, alpha=0.7)
    ax.set_xticks(x, list(methods))
    ax.set_ylabel(f"test {_NAMES[metric]} per split")
    ax.set_ylim(0, 1.05)
    text = ", ".join(f"{np.nanmean(s):.2f} ± {sd:.2f}" for s, sd in zip(scores, sds, strict=True))
    ax.set_title(f"{result['n_splits']}-split cross-validation\n{text}", fontsize=10)
    return finish(ax, show, save)
