"""``tl.predict``: a fine-tuned classifier run over cells, and its predictions written."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._deprecation import renamed_keywords
from .._plan import execution_plan
from .._progress import progress_bar
from .._settings import settings
from .._slots import check_key_added, positions_of, table_to_var, var_tokens
from ..data._batching import check_token_budget, restore_order, token_budget_batches
from ..model._classifier import GeneformerClassifier
from ..model._multitask import MultitaskClassifier
from ..train._finetune_loop import classifier_logits
from ..train._optim import resolve_device_dtype
from ._inference import inference_on
from ._task_slots import check_task_keys, task_columns, task_keys
from ._tokens import cell_tokens

DEFAULT_PREDICT_KEY = "geneformer_class"


def prediction_slots(key: str, uns_key: str) -> dict[str, list[str]]:
    """Return the slots a classifier's predictions go to under ``key``."""
    return {
        "obs": [f"{key}_pred", f"{key}_split"],
        "obsm": [f"{key}_proba"],
        "var": [f"{key}_pred", f"{key}_score", f"{key}_n_cells"],
        "uns": [uns_key],
    }


def cell_proba(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    *,
    budget: int | None,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> np.ndarray:
    """Class probabilities per cell in input order; NaN rows for cells without tokens."""
    plan = execution_plan(device, dtype)
    packed = plan.packed
    proba = np.full((len(n_tokens), clf.n_classes), np.nan, dtype=np.float32)
    present = np.flatnonzero(n_tokens > 0)
    if not present.size:
        return proba
    batches = token_budget_batches(n_tokens[present], budget, padded=not packed)
    results = []
    bar = progress_bar(total=len(present), desc="predict", unit="cells", enabled=progress)
    with inference_on(clf, plan), bar:
        for batch in batches:
            logits, _ = classifier_logits(clf, tokens, n_tokens, present[batch], packed)
            results.append(clf.class_probabilities(logits).cpu().numpy())
            bar.update(len(batch))
    proba[present] = restore_order(results, batches)
    return proba


def gene_proba(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    *,
    budget: int | None,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Each token id's class probabilities averaged over the cells holding it, and those counts.

    Returns ``(vocab_size, n_classes)`` means (NaN for tokens in no cell) and ``(vocab_size,)``
    cell counts (a gene occurs at most once per cell).
    """
    plan = execution_plan(device, dtype)
    packed = plan.packed
    size = len(clf.vocab)
    sums = torch.zeros((size, clf.n_classes), dtype=torch.float64, device=device)
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    present = np.flatnonzero(n_tokens > 0)
    batches = token_budget_batches(n_tokens[present], budget, padded=not packed)
    bar = progress_bar(total=len(present), desc="predict genes", unit="cells", enabled=progress)
    with inference_on(clf, plan), bar:
        for batch in batches:
            logits, ids = classifier_logits(clf, tokens, n_tokens, present[batch], packed)
            sums.index_add_(0, ids, torch.softmax(logits.double(), dim=-1))
            counts += torch.bincount(ids, minlength=size)
            bar.update(len(batch))
    sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means, counts


def write_cell_predictions(adata: AnnData, key: str, classes: list[str], proba: np.ndarray) -> None:
    """Write ``obs[f"{key}_pred"]`` (NaN where a row is NaN) and ``obsm[f"{key}_proba"]``."""
    known = ~np.isnan(proba).any(axis=1)
    codes = np.where(known, np.nan_to_num(proba).argmax(axis=1), -1)
    adata.obs[f"{key}_pred"] = pd.Categorical.from_codes(codes, categories=classes)
    # A plain array, not a DataFrame: class names may hold "/", which h5 stores refuse as
    # column names; the names are in uns.
    adata.obsm[f"{key}_proba"] = proba


def write_task_predictions(
    adata: AnnData,
    prefixes: Mapping[str, str],
    tasks: Mapping[str, list[str]],
    proba: np.ndarray,
) -> None:
    """Write each task's block of ``proba`` (tasks side by side) under its column's prefix."""
    for column, block in task_columns(proba, tasks).items():
        write_cell_predictions(adata, prefixes[column], tasks[column], block)


def write_gene_predictions(
    adata: AnnData,
    key: str,
    classes: list[str],
    gene_token: np.ndarray,
    pred: np.ndarray,
    score: np.ndarray,
    folds: np.ndarray | None,
) -> None:
    """Per-gene results onto the ``var`` rows holding each gene's token; NaN elsewhere."""
    index, found = positions_of(gene_token, var_tokens(adata))
    codes = np.where(found, pred[index], -1)
    adata.var[f"{key}_pred"] = pd.Categorical.from_codes(codes, categories=classes)
    adata.var[f"{key}_score"] = np.where(found, score[index], np.nan)
    if folds is not None:
        adata.var[f"{key}_fold"] = np.where(found, folds[index], -1)


@renamed_keywords(batch_tokens="token_budget")
def predict(
    adata: AnnData,
    clf: GeneformerClassifier,
    *,
    key_added: str | None = None,
    token_budget: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Apply a fine-tuned classifier to cells.

    The cells are tokenized with the classifier's vocabulary first when
    ``obsm["geneformer_tokens"]`` is absent; tokens made with another vocabulary are refused.

    Parameters
    ----------
    adata
        Cells; tokens or raw counts.
    clf
        From :func:`finetune`, or loaded with
        :meth:`~scgeneformer.GeneformerClassifier.from_pretrained`.
    key_added
        Prefix of the result slots; default the classifier's ``label_key``, else
        ``"geneformer_class"``.
    token_budget
        Tokens per batch (default ``sgf.settings.token_budget``; ``batch_tokens=`` is its old
        name, which still works with a warning until version 0.3).
    device, dtype
        Default ``sgf.settings``; the classifier is moved to ``device``.

    Returns
    -------
    None. A cell classifier writes ``obs[f"{key}_pred"]`` (categorical) and
    ``obsm[f"{key}_proba"]`` (columns ordered as ``uns[f"{key}_predict"]["classes"]``) for
    every cell (NaN for cells without tokens, with a warning), and ``uns[f"{key}_predict"]``.
    A gene classifier averages each gene's token probabilities over the cells and writes
    ``var[f"{key}_pred"]``, ``var[f"{key}_score"]`` (as in :func:`finetune`),
    ``var[f"{key}_n_cells"]`` and ``uns[f"{key}_predict"]``.
    A multitask classifier (``finetune`` with ``label_key`` a list) writes, for each label
    column, ``obs[f"{column}_pred"]`` and ``obsm[f"{column}_proba"]`` (each prefixed
    ``f"{key_added}_"`` when ``key_added`` is given), and ``uns[f"{key}_predict"]`` with
    ``tasks`` (each column's classes), ``key`` being ``key_added`` or the columns joined by
    ``"_"``.

    Examples
    --------
    >>> clf = sgf.tl.finetune(reference, model, label_key="cell_type")  # doctest: +SKIP
    >>> sgf.tl.predict(query, clf)  # doctest: +SKIP
    >>> query.obs["cell_type_pred"].value_counts()  # doctest: +SKIP
    """
    if not isinstance(clf, GeneformerClassifier):
        raise TypeError(f"clf must be a GeneformerClassifier, got {type(clf).__name__}.")
    tasks = clf.tasks if isinstance(clf, MultitaskClassifier) else None
    if tasks is None:
        key = key_added or clf.label_key or DEFAULT_PREDICT_KEY
        check_key_added(key, prediction_slots(key, f"{key}_predict"), tool="tl.predict")
    else:
        keys = task_keys(list(tasks), key_added)
        check_task_keys(keys, tool="tl.predict", uns_suffix="predict")
        key = keys.shared
    check_token_budget(token_budget)
    device_, dtype_ = resolve_device_dtype(device, dtype)
    tokens, n_tokens = cell_tokens(adata, clf.encoder)
    empty = int((n_tokens == 0).sum())
    if empty:
        warnings.warn(
            f"{empty:,} cells have no tokens; they get no prediction (NaN).",
            UserWarning,
            stacklevel=2,
        )
    info: dict[str, Any] = {
        "task": clf.task,
        "classes": clf.classes,
        "vocabulary_sha256": clf.vocab.sha256,
        "n_cells_without_tokens": empty,
        "execution_plan": execution_plan(device_, dtype_, log=False).as_dict(),
    }
    if tasks is not None:
        info["tasks"] = tasks
    run = {"budget": token_budget, "device": device_, "dtype": dtype_}
    if clf.task == "cell":
        proba = cell_proba(clf, tokens, n_tokens, progress=settings.progress, **run)
        if tasks is None:
            write_cell_predictions(adata, key, clf.classes, proba)
        else:
            write_task_predictions(adata, keys.prefixes, tasks, proba)
    else:
        means, counts = gene_proba(clf, tokens, n_tokens, progress=settings.progress, **run)
        seen = np.flatnonzero(counts > 0)
        proba = means[seen]
        score = proba[:, 1] if clf.n_classes == 2 else proba.max(axis=1)
        write_gene_predictions(
            adata, key, clf.classes, seen, proba.argmax(axis=1), score, folds=None
        )
        adata.var[f"{key}_n_cells"] = table_to_var(var_tokens(adata), counts, 0).astype(np.int64)
    adata.uns[f"{key}_predict"] = info
