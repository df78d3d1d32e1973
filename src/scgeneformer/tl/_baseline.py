"""The classifier a user would otherwise pick: logistic regression on PCA of log-counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

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
    ``{"method", "n_comps", "accuracy", "macro_f1"}``.

    Examples
    --------
    >>> result = pca_logreg_baseline(adata, y, train, test)  # doctest: +SKIP
    >>> result["macro_f1"]  # doctest: +SKIP
    0.87
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

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
    pred = regression.predict(pca.transform(test_x))
    truth = y[test_cells]
    return {
        "method": "logistic regression on PCA of log-normalised counts",
        "n_comps": n_comps,
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
    }
