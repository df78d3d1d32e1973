"""The gene task of ``tl.finetune``: genes dealt into folds, a token head trained per fold."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData

from .._slots import counts_layer, positions_of, var_tokens
from ..model import Geneformer
from ..model._classifier import GeneformerClassifier
from ..train._finetune_loop import FitOptions, fit_classifier
from ..train._history import history_frames, merge_histories
from ..train._optim import seed_everything
from ._baseline import coexpression_baseline
from ._finetune_common import auroc, classification_metrics, new_classifier
from ._labels import check_class_sizes, class_weights, gene_label_table
from ._predict import gene_proba, write_gene_predictions
from ._splits import gene_folds
from ._tokens import cell_tokens

logger = logging.getLogger(__name__)


def finetune_genes(
    adata: AnnData,
    model: Geneformer,
    *,
    label_key: str,
    key: str,
    gene_labels: Mapping[str, Any] | pd.Series | None,
    n_folds: int,
    baseline: bool,
    options: FitOptions,
) -> GeneformerClassifier:
    """Run the gene task of :func:`scgeneformer.tl.finetune` (which lists the slots written)."""
    tokens, n_tokens = cell_tokens(adata, model)
    table, classes = gene_label_table(adata, model, label_key, gene_labels)
    # Padding (<pad> = 0) lands on id 0, never a gene's, so no mask is needed.
    occurrences = np.bincount(tokens.ravel(), minlength=len(model.vocab))
    absent = occurrences[table["token"]] == 0
    if absent.any():
        warnings.warn(
            f"{int(absent.sum()):,} labelled genes occur in no cell's tokens and are left out, "
            f"e.g. {table.loc[absent, 'gene'].tolist()[:3]}.",
            UserWarning,
            stacklevel=3,
        )
        table = table[~absent].reset_index(drop=True)
    check_class_sizes(
        table["code"].to_numpy(),
        classes,
        "the labelled genes found in the cells",
        n_folds,
        f"genes to have one in each of the n_folds={n_folds} folds (lower n_folds, or label "
        "more genes)",
    )
    gene_token = table["token"].to_numpy()
    gene_code = table["code"].to_numpy()
    folds = gene_folds(gene_code, n_folds, options.random_state)
    device, dtype = options.device, options.dtype
    seed_everything(options.random_state)
    rng = np.random.default_rng(options.random_state)

    def train_on(genes: np.ndarray, seed: int, desc: str) -> tuple[GeneformerClassifier, dict]:
        token_class = np.full(len(model.vocab), -100, dtype=np.int64)
        token_class[gene_token[genes]] = gene_code[genes]
        cells = np.flatnonzero((token_class >= 0)[tokens].any(axis=1))
        weights = class_weights(
            np.repeat(gene_code[genes], occurrences[gene_token[genes]]),
            len(classes),
            options.class_weight,
        )
        targets = torch.as_tensor(token_class, device=device)
        weight_t = torch.as_tensor(weights, device=device)

        def loss_fn(_batch: np.ndarray, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, targets[ids], weight_t, ignore_index=-100)

        clf = new_classifier(
            model,
            classes,
            task="gene",
            label_key=label_key,
            freeze_layers=options.freeze_layers,
            random_state=seed,
        )
        history = fit_classifier(
            clf,
            tokens,
            n_tokens,
            cells,
            loss_fn,
            options,
            rng=rng,
            evaluate=None,
            patience=None,
            desc=desc,
        )
        return clf, history

    oof = np.full((len(table), len(classes)), np.nan)
    fold_scores: dict[str, list[float]] = {"auroc": [], "accuracy": [], "n_genes": []}
    histories = []
    for fold in range(n_folds):
        held = np.flatnonzero(folds == fold)
        clf, history = train_on(
            np.flatnonzero(folds != fold), options.random_state + fold, f"fold {fold + 1}"
        )
        histories.append(_with_fold(history, fold))
        is_held = np.zeros(len(model.vocab), dtype=bool)
        is_held[gene_token[held]] = True
        cells = np.flatnonzero(is_held[tokens].any(axis=1))
        means, _ = gene_proba(
            clf,
            tokens[cells],
            n_tokens[cells],
            budget=options.eval_budget,
            device=device,
            dtype=dtype,
            progress=False,
        )
        oof[held] = means[gene_token[held]]
        fold_scores["auroc"].append(auroc(gene_code[held], oof[held]))
        fold_scores["accuracy"].append(float((oof[held].argmax(axis=1) == gene_code[held]).mean()))
        fold_scores["n_genes"].append(len(held))
        logger.info(
            f"gene fold {fold + 1}/{n_folds}: AUROC {fold_scores['auroc'][-1]:.3f}, accuracy "
            f"{fold_scores['accuracy'][-1]:.3f} over {len(held)} genes."
        )
    final, final_history = train_on(
        np.arange(len(table)), options.random_state + n_folds, "final fit"
    )
    histories.append(_with_fold(final_history, -1))

    pred = oof.argmax(axis=1)
    score = oof[:, 1] if len(classes) == 2 else oof.max(axis=1)
    scores = classification_metrics(gene_code, pred, len(classes))
    genes_table = {
        "gene": table["gene"].tolist(),
        "token": gene_token,
        "label": [classes[c] for c in gene_code],
        "fold": folds,
        "pred": [classes[c] for c in pred],
        "score": score,
    }
    write_gene_predictions(adata, key, classes, gene_token, pred, score, folds)
    params = options.params(n_folds=n_folds)
    adata.uns[f"{key}_finetune"] = {
        "task": "gene",
        "label_key": label_key,
        "classes": classes,
        "folds": fold_scores,
        "auroc": auroc(gene_code, oof),
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "confusion_matrix": {"labels": classes, "counts": scores["confusion"]},
        "genes": genes_table,
        "history": history_frames(merge_histories(histories)),
        "params": params,
    }
    if baseline:
        _gene_baseline(adata, adata.uns[f"{key}_finetune"], gene_token, gene_code, folds, options)
    final.history = final_history
    final.training_args = {
        **params,
        "task": "gene",
        "label_key": label_key,
        "cv_auroc": adata.uns[f"{key}_finetune"]["auroc"],
        "cv_accuracy": scores["accuracy"],
    }
    return final


def _gene_baseline(
    adata: AnnData,
    result: dict[str, Any],
    gene_token: np.ndarray,
    gene_code: np.ndarray,
    folds: np.ndarray,
    options: FitOptions,
) -> None:
    """Score the co-expression baseline on the model's folds into ``result["baseline"]``.

    Genes without a column in ``adata`` (labelled through the vocabulary's mapping only) are
    left out of the baseline, which says how many it scored.
    """
    layer = counts_layer(adata)
    counts = adata.X if layer is None else adata.layers[layer]
    columns, has_column = positions_of(var_tokens(adata), gene_token)
    fitted = coexpression_baseline(
        counts,
        columns[has_column],
        gene_code[has_column],
        folds[has_column],
        len(result["classes"]),
        random_state=options.random_state,
    )
    fitted["n_genes"] = int(has_column.sum())
    result["baseline"] = fitted
    logger.info(
        f"finetune (genes): cross-validated AUROC {result['auroc']:.3f}; co-expression "
        f"baseline {fitted['auroc']:.3f}."
    )


def _with_fold(history: dict[str, list[dict]], fold: int) -> dict[str, list[dict]]:
    """Tag every record of one fold's history with the fold (-1: the final fit)."""
    return {part: [{"fold": fold, **r} for r in records] for part, records in history.items()}
