"""Plots of training runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from .._docs import doc_params, doc_plot_output
from ..model import Geneformer, GeneformerClassifier
from ..model._hf_folder import METADATA_NAME
from ..train._history import EVAL_SCORES, as_history
from ._utils import finish, new_axes


def _history(
    source: Geneformer | GeneformerClassifier | dict[str, Any] | str | os.PathLike,
) -> dict[str, list[dict[str, Any]]]:
    """Read the history of a model, classifier, dict, file or folder (one format for all)."""
    if isinstance(source, GeneformerClassifier):
        return as_history(source.history)
    if isinstance(source, Geneformer):
        history = source.training_args.get("history")
        if history is None:
            raise ValueError(
                "This model has no training history: it was not trained with sgf.tl.pretrain "
                "(or was loaded from a checkpoint saved without one)."
            )
        return as_history(history)
    if isinstance(source, dict):
        return as_history(source.get("history", source))
    path = Path(source)
    if path.is_dir():
        for candidate in (path / "history.json", path / METADATA_NAME):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(
                f"{str(path)!r} holds neither history.json nor {METADATA_NAME}; give the "
                "output_dir of a pretraining run or a saved model folder."
            )
    data = json.loads(path.read_text(encoding="utf-8"))
    if path.name == METADATA_NAME:
        data = data.get("history") or (data.get("training_args") or {}).get("history")
        if data is None:
            raise ValueError(f"{str(path)!r} records no training history.")
    return as_history(data)


@doc_params(plot_output=doc_plot_output)
def loss_curve(
    source: Geneformer | GeneformerClassifier | dict[str, Any] | str | os.PathLike,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Plot the masked-gene loss against the step, and held-out accuracy on a second axis.

    Parameters
    ----------
    source
        A model trained by :func:`scgeneformer.tl.pretrain` (its ``training_args``), a
        classifier from :func:`scgeneformer.tl.finetune` (its per-epoch history, plotted with
        the validation macro-F1), a history dict, ``history.json``, or a run or model folder.
    {plot_output}

    Returns
    -------
    The Axes (loss; the accuracy axis is its twin) when ``show`` is False, else None.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> ax = sgf.pl.loss_curve("runs/v1", show=False)  # doctest: +SKIP
    """
    history = _history(source)
    train, evaluation = history["train"], history["eval"]
    score = next((k for k in EVAL_SCORES if evaluation and k in evaluation[0]), "accuracy")
    score_label = EVAL_SCORES[score]
    if not train and not evaluation:
        raise ValueError("The training history is empty: no step was logged.")
    ax = new_axes(ax, (6, 4))
    ax.plot(
        [r["step"] for r in train], [r["loss"] for r in train], color="C0", label="training loss"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    handles, labels = ax.get_legend_handles_labels()
    if evaluation:
        twin = ax.twinx()
        steps = [r["step"] for r in evaluation]
        scores = [r[score] for r in evaluation]
        twin.plot(steps, scores, color="C1", marker="o", label=score_label)
        if all("frequency_baseline" in r for r in evaluation):
            baseline = [r["frequency_baseline"] for r in evaluation]
            twin.plot(
                steps, baseline, color="C1", linestyle=":", marker=".", label="most frequent gene"
            )
            scores = scores + baseline
        twin.set_ylabel(score_label, color="C1")
        twin.tick_params(axis="y", colors="C1")
        # From 0 to a little above the best score, so that a low accuracy and its baseline
        # are both readable instead of sitting on the floor of a 0-1 axis.
        top = max([s for s in scores if s == s] or [1.0])
        top = min(1.0, 1.15 * top) if top > 0 else 1.0
        twin.set_ylim(-0.03 * top, top)  # a score of 0 stays a whole marker
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # Above the plot, out of the data's way.
    ax.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=len(labels),
        frameon=False,
        fontsize=8,
    )
    return finish(ax, show, save)


__all__ = ["loss_curve"]
