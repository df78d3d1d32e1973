"""Plot of a fine-tuning search: each trial's validation score and the best so far."""

from __future__ import annotations

import os

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from .._docs import doc_params, doc_plot_output
from ._utils import finish, new_axes, stored_result


@doc_params(plot_output=doc_plot_output)
def tune_trials(
    adata: AnnData,
    key: str,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Plot the validation macro-F1 of each trial of :func:`scgeneformer.tl.tune_finetune`.

    Complete trials are dots and pruned ones crosses on the axis' floor (a pruned trial has
    no final score); the line is the best score so far, and the best trial is ringed, its
    settings in the title.

    Parameters
    ----------
    adata
        Cells after :func:`scgeneformer.tl.tune_finetune`.
    key
        Its ``key_added`` (default the ``label_key``).
    {plot_output}

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.tl.tune_finetune(adata, model, label_key="state", n_trials=10)  # doctest: +SKIP
    >>> ax = sgf.pl.tune_trials(adata, "state", show=False)  # doctest: +SKIP
    """
    result = stored_result(
        adata,
        f"{key}_tune",
        ("trials",),
        f"sgf.tl.tune_finetune(adata, model, label_key={key!r})",
    )
    trials = result["trials"]
    number = np.asarray(trials["number"])
    value = np.asarray(trials["value"], dtype=float)
    complete = np.asarray(trials["state"]) == "complete"
    ax = new_axes(ax, (5.5, 3.6))
    ax.scatter(number[complete], value[complete], color="#4c72b0", label="complete", zorder=3)
    if (~complete).any():
        ax.scatter(
            number[~complete],
            np.zeros((~complete).sum()),
            marker="x",
            color="grey",
            label="pruned",
            zorder=3,
        )
    running = np.fmax.accumulate(np.where(complete, value, -np.inf))
    ax.step(
        number,
        np.where(np.isfinite(running), running, np.nan),
        where="post",
        color="black",
        lw=1,
        label="best so far",
    )
    best = result["best_trial"]
    ax.scatter([best], [result["best_value"]], s=160, facecolors="none", edgecolors="red", zorder=4)
    settings = ", ".join(
        f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result["best_params"].items()
    )
    ax.set_title(f"best trial {best}: {result['best_value']:.3f}\n{settings}", fontsize=9)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are numbered
    ax.set_ylabel(result.get("metric", "validation macro-F1"))
    ax.set_ylim(-0.03, 1.05)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return finish(ax, show, save)
