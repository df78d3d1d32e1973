"""The classifier a user would otherwise pick: logistic regression on PCA of log-counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ._metrics import classification_scores

N_COMPS = 50


def log_normalize(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """``log1p`` of counts scaled to 10,000 per cell (scanpy's ``normalize_total`` + ``log1p``).

    Works on a copy; cells with no counts stay zero.

    Examples
    --------
    >>> log_normalize(np.array([[1.0, 3.0], [0.0, 0.0]])).toarray().round(3).tolist()
    [[7.824, 8.923], [0.0, 0.0]]
    """
    matrix = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    matrix = sp.diags(scale) @ matrix
    matrix.data = np.log1p(matrix.data)
    return sp.csr_matrix(matrix)


def pca_logreg_baseline(
    adata: AnnData,
    y: np.ndarray,
    fit_cells: np.ndarray,
    test_cells: np.ndarray,
    *,
    layer: str | None = None,
    class_weight: str | None = "balanced",
    n_comps: int = N_COMPS,
    random_state: int | None = 0,
) -> dict[str, Any]:
    """Fit logistic regression on PCA of log-normalised counts; score it on the test cells.

    The counts are normalised to 10,000 per cell and ``log1p``-transformed; PCA (at most
    ``n_comps`` components, sparse, implicitly centred) is fitted on the training cells only
    and applied to the test cells. Genes with no count in any training cell are left out.

    Parameters
    ----------
    adata
        Cells by genes with raw counts in ``X`` or ``layers[layer]``.
    y
        Integer class of every cell of ``adata``.
    fit_cells, test_cells
        Indices of the cells to fit on and to score.
    layer
        Layer with the counts; default ``X``.
    class_weight
        ``"balanced"`` or None, passed to the logistic regression.
    n_comps
        Principal components at most.
    random_state
        Seed of the PCA solver and the regression.

    Returns
    -------
    ``{"method", "n_comps", "accuracy", "macro_f1", "f1_per_class", "auroc"}`` (as
    :func:`~scgeneformer.tl._metrics.classification_scores`).

    Examples
    --------
    >>> result = pca_logreg_baseline(adata, y, train, test)  # doctest: +SKIP
    >>> result["macro_f1"]  # doctest: +SKIP
    0.87
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    counts = adata.X if layer is None else adata.layers[layer]
    train_x = log_normalize(counts[fit_cells])
    test_x = log_normalize(counts[test_cells])
    detected = np.flatnonzero(train_x.getnnz(axis=0))
    train_x, test_x = train_x[:, detected], test_x[:, detected]
    n_comps = int(min(n_comps, len(fit_cells) - 1, len(detected) - 1))
    pca = PCA(n_components=n_comps, svd_solver="arpack", random_state=random_state)
    train_pcs = pca.fit_transform(train_x)
    regression = LogisticRegression(
        max_iter=2000, class_weight=class_weight, random_state=random_state
    )
    regression.fit(train_pcs, y[fit_cells])
    # Columns for every class, also one absent from the fitting cells (probability 0).
    proba = np.zeros((len(test_cells), int(y.max()) + 1))
    proba[:, regression.classes_] = regression.predict_proba(pca.transform(test_x))
    scores = classification_scores(y[test_cells], proba)
    del scores["confusion"]
    return {
        "method": "logistic regression on PCA of log-normalised counts",
        "n_comps": n_comps,
        **scores,
    }


MAX_BASELINE_CELLS = 20_000


def coexpression_baseline(
    counts: sp.spmatrix | np.ndarray,
    columns: np.ndarray,
    codes: np.ndarray,
    folds: np.ndarray,
    n_classes: int,
    *,
    random_state: int | None = 0,
) -> dict[str, Any]:
    """Class genes by co-expression with the labelled genes of the other folds.

    The simple rival of a gene classifier: for a held-out gene, the score of class c is its mean
    Pearson correlation (over cells, log-normalised counts) with the training genes of class c,
    and the predicted class the highest score. Scored out of fold on the same folds as the
    model. At most 20,000 cells are used, drawn at random.

    Parameters
    ----------
    counts
        Cells by genes, raw counts.
    columns
        Column of ``counts`` of each labelled gene.
    codes
        Class of each labelled gene (0 .. n_classes - 1).
    folds
        Fold of each labelled gene.
    n_classes
        Number of classes.
    random_state
        Seed of the cell sample.

    Returns
    -------
    ``{"method", "auroc", "accuracy", "folds": {"auroc", "accuracy"}}``; the AUROC is of the
    second class with two classes, else the one-vs-rest macro AUROC.

    Examples
    --------
    >>> result = coexpression_baseline(adata.X, columns, codes, folds, 2)  # doctest: +SKIP
    >>> result["auroc"]  # doctest: +SKIP
    0.97
    """
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(random_state)
    n_cells = counts.shape[0]
    cells = np.sort(rng.choice(n_cells, min(n_cells, MAX_BASELINE_CELLS), replace=False))
    expression = log_normalize(counts[cells])[:, columns].toarray()
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num(np.corrcoef(expression, rowvar=False))
    scores = np.zeros((len(codes), n_classes))
    for fold in np.unique(folds):
        held, train = folds == fold, folds != fold
        for c in range(n_classes):
            members = train & (codes == c)
            if members.any():
                scores[held, c] = correlation[np.ix_(held, members)].mean(axis=1)

    def auroc(truth: np.ndarray, score: np.ndarray) -> float:
        """As the model's: second class with two classes, else one-vs-rest macro."""
        if n_classes == 2:
            if len(np.unique(truth)) < 2:
                return float("nan")
            return float(roc_auc_score(truth == 1, score[:, 1] - score[:, 0]))
        present = [c for c in range(n_classes) if 0 < (truth == c).sum() < len(truth)]
        if not present:
            return float("nan")
        return float(np.mean([roc_auc_score(truth == c, score[:, c]) for c in present]))

    pred = scores.argmax(axis=1)
    fold_ids = np.unique(folds)
    return {
        "method": "mean correlation with each class's labelled genes of the other folds",
        "auroc": auroc(codes, scores),
        "accuracy": float((pred == codes).mean()),
        "folds": {
            "auroc": [auroc(codes[folds == f], scores[folds == f]) for f in fold_ids],
            "accuracy": [float((pred[folds == f] == codes[folds == f]).mean()) for f in fold_ids],
        },
    }
