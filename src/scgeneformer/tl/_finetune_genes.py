"""The gene task of ``tl.finetune``: genes dealt into folds, a token head trained per fold."""

from __future__ import annotations

import dataclasses
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
from ..train._history import history_frames, merge_histories, tag_records
from ..train._optim import seed_everything
from ._baseline import coexpression_baseline
from ._finetune_common import new_classifier
from ._labels import check_class_sizes, class_weights, gene_label_table
from ._metrics import auroc, classification_scores
from ._predict import gene_proba, write_gene_predictions
from ._splits import gene_folds
from ._tokens import cell_tokens

# lr="auto" for genes: no range test. A token classifier learns the labelled genes by their
# own embeddings (its training loss reaches 0 within an epoch at any rate tried), so the range
# test's loss falls everywhere and it picks a high rate (1e-2), at which the model memorises
# the training genes and classes unseen ones worse than chance. Measured on two gene modules
# (bench/bench_gene_task.py, 3 seeds, out-of-fold AUROC): range test 0.52 from random weights,
# 0.30 after 150 masked-gene steps; a fixed 1e-3 0.93 and 0.91.
GENE_TASK_LR = 1e-3

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
    if options.lr == "auto":
        options = dataclasses.replace(options, lr=GENE_TASK_LR)
    tokens, n_tokens = cell_tokens(adata, model)
    table, classes = gene_label_table(adata, model, label_key, gene_labels)
    # Padding (<pad> = 0) lands on id 0, never a gene's, so no mask is needed.
    occurrences = np.bincount(tokens.ravel(), minlength=len(model.vocab))
    table = _genes_in_cells(table, occurrences, classes, n_folds)
    seed_everything(options.random_state)
    task = _GeneTask(
        model,
        tokens,
        n_tokens,
        occurrences,
        table["token"].to_numpy(),
        table["code"].to_numpy(),
        classes,
        label_key,
        options,
        np.random.default_rng(options.random_state),
    )
    folds = gene_folds(task.gene_code, n_folds, options.random_state)
    oof = np.full((len(table), len(classes)), np.nan)
    fold_scores: dict[str, list[float]] = {"auroc": [], "accuracy": [], "n_genes": []}
    histories = []
    for fold in range(n_folds):
        held = np.flatnonzero(folds == fold)
        clf, history = task.train(
            np.flatnonzero(folds != fold), options.random_state + fold, f"fold {fold + 1}"
        )
        histories.append(tag_records(history, fold=fold))
        oof[held] = task.predict(clf, held)
        held_code = task.gene_code[held]
        fold_scores["auroc"].append(auroc(held_code, oof[held]))
        fold_scores["accuracy"].append(float((oof[held].argmax(axis=1) == held_code).mean()))
        fold_scores["n_genes"].append(len(held))
        logger.info(
            f"gene fold {fold + 1}/{n_folds}: AUROC {fold_scores['auroc'][-1]:.3f}, accuracy "
            f"{fold_scores['accuracy'][-1]:.3f} over {len(held)} genes."
        )
    final, final_history = task.train(
        np.arange(len(table)), options.random_state + n_folds, "final fit"
    )
    histories.append(tag_records(final_history, fold=-1))

    result = _write_gene_results(adata, key, task, table["gene"].tolist(), folds, oof)
    result.update(folds=fold_scores, history=history_frames(merge_histories(histories)))
    result["params"] = params = options.params(n_folds=n_folds)
    if baseline:
        _gene_baseline(adata, result, task.gene_token, task.gene_code, folds, options)
    final.history = final_history
    final.training_args = {
        **params,
        "task": "gene",
        "label_key": label_key,
        "cv_auroc": result["auroc"],
        "cv_accuracy": result["accuracy"],
    }
    return final


def _genes_in_cells(
    table: pd.DataFrame, occurrences: np.ndarray, classes: list, n_folds: int
) -> pd.DataFrame:
    """Drop (with a warning) labelled genes in no cell; check the rest fill every fold."""
    absent = occurrences[table["token"]] == 0
    if absent.any():
        warnings.warn(
            f"{int(absent.sum()):,} labelled genes occur in no cell's tokens and are left out, "
            f"e.g. {table.loc[absent, 'gene'].tolist()[:3]}.",
            UserWarning,
            stacklevel=4,
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
    return table


@dataclasses.dataclass
class _GeneTask:
    """The cells' tokens and the labelled genes, shared by every fold's fit and prediction."""

    model: Geneformer
    tokens: np.ndarray
    n_tokens: np.ndarray
    occurrences: np.ndarray  # per token id: how often it occurs in the cells
    gene_token: np.ndarray  # per labelled gene
    gene_code: np.ndarray
    classes: list
    label_key: str
    options: FitOptions
    rng: np.random.Generator  # one stream across folds, so a fit depends on its fold only

    def train(self, genes: np.ndarray, seed: int, desc: str) -> tuple[GeneformerClassifier, dict]:
        """Fit a token head on the labelled ``genes`` (rows of the label table)."""
        options, device = self.options, self.options.device
        token_class = np.full(len(self.model.vocab), -100, dtype=np.int64)
        token_class[self.gene_token[genes]] = self.gene_code[genes]
        cells = np.flatnonzero((token_class >= 0)[self.tokens].any(axis=1))
        weights = class_weights(
            np.repeat(self.gene_code[genes], self.occurrences[self.gene_token[genes]]),
            len(self.classes),
            options.class_weight,
        )
        targets = torch.as_tensor(token_class, device=device)
        weight_t = torch.as_tensor(weights, device=device)

        def loss_fn(_batch: np.ndarray, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, targets[ids], weight_t, ignore_index=-100)

        clf = new_classifier(
            self.model,
            self.classes,
            task="gene",
            label_key=self.label_key,
            options=options,
            random_state=seed,
        )
        history = fit_classifier(
            clf,
            self.tokens,
            self.n_tokens,
            cells,
            loss_fn,
            options,
            rng=self.rng,
            evaluate=None,
            patience=None,
            desc=desc,
        )
        return clf, history

    def predict(self, clf: GeneformerClassifier, held: np.ndarray) -> np.ndarray:
        """Class probabilities of the ``held`` genes, averaged over the cells holding them."""
        is_held = np.zeros(len(self.model.vocab), dtype=bool)
        is_held[self.gene_token[held]] = True
        cells = np.flatnonzero(is_held[self.tokens].any(axis=1))
        means, _ = gene_proba(
            clf,
            self.tokens[cells],
            self.n_tokens[cells],
            budget=self.options.eval_budget,
            device=self.options.device,
            dtype=self.options.dtype,
            progress=False,
        )
        return means[self.gene_token[held]]


def _write_gene_results(
    adata: AnnData,
    key: str,
    task: _GeneTask,
    genes: list[str],
    folds: np.ndarray,
    oof: np.ndarray,
) -> dict[str, Any]:
    """Write the out-of-fold predictions to ``var`` and return the ``uns`` summary."""
    classes, gene_code = task.classes, task.gene_code
    pred = oof.argmax(axis=1)
    score = oof[:, 1] if len(classes) == 2 else oof.max(axis=1)
    scores = classification_scores(gene_code, oof)
    write_gene_predictions(adata, key, classes, task.gene_token, pred, score, folds)
    result = {
        "task": "gene",
        "label_key": task.label_key,
        "classes": classes,
        "auroc": auroc(gene_code, oof),
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "confusion_matrix": {"labels": classes, "counts": scores["confusion"]},
        "genes": {
            "gene": genes,
            "token": task.gene_token,
            "label": [classes[c] for c in gene_code],
            "fold": folds,
            "pred": [classes[c] for c in pred],
            "score": score,
        },
    }
    adata.uns[f"{key}_finetune"] = result
    return result


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
