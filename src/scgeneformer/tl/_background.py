"""Background genes for a screen of a short gene list: a rank-matched null, drawn at random.

A gene's test needs other genes deleted in the same cells to compare with. When only a few
genes are listed, the other listed genes are too few (and may all be real hits), so a random
set of other genes expressed in the same cells is screened beside them and serves as the null.
Each background gene is drawn near a listed gene in (mean relative rank, cells expressing it),
so that the null genes sit where the listed genes sit in the cells' rankings and are deleted
in about as many cells.
"""

from __future__ import annotations

import numpy as np


def token_profile(
    tokens: np.ndarray, n_tokens: np.ndarray, cells: np.ndarray, special: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Genes expressed in ``cells``: token ids, cells expressing each, mean relative rank.

    The relative rank of a gene in a cell is its position over the cell's length (0 is the
    top), so that cells of different lengths compare.

    Examples
    --------
    >>> tokens = np.array([[2, 10, 11, 3], [2, 11, 3, 0]])
    >>> token_profile(tokens, np.array([4, 3]), np.arange(2), np.array([0, 2, 3]))
    (array([10, 11]), array([1, 2]), array([0.25      , 0.41666667]))
    """
    rows = tokens[cells].astype(np.int64)
    length = n_tokens[cells].astype(np.float64)
    cols = np.arange(rows.shape[1])
    valid = (cols[None, :] < length[:, None]) & ~np.isin(rows, special)
    relative = np.broadcast_to(cols[None, :] / length[:, None], rows.shape)[valid]
    genes, inverse, counts = np.unique(rows[valid], return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=relative, minlength=len(genes)) / counts
    return genes, counts, mean_rank


def rank_matched_background(
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    cells: np.ndarray,
    listed: np.ndarray,
    n_background: int,
    *,
    special: np.ndarray,
    min_cells: int = 1,
    random_state: int = 0,
) -> np.ndarray:
    """Token ids of up to ``n_background`` random genes matched to the ``listed`` ones.

    Candidates are the genes expressed in at least ``min_cells`` of ``cells``, not listed and
    not special tokens. Each listed gene found in the cells gets an equal share of the draws;
    its share is drawn at random from the candidates nearest it in mean relative rank and
    log cell count (both scaled by the candidates' spread), among three times as many as it
    draws. Listed genes absent from every cell (an overexpression insert) match nothing; with
    none present the draw is uniform. All candidates are returned when there are too few.

    Parameters
    ----------
    tokens, n_tokens
        Token rows and their lengths, as the screen reads them.
    cells
        Rows of the cells screened.
    listed
        Token ids of the genes under test.
    n_background
        How many background genes to draw.
    special
        Token ids that are not genes (``<pad>``, ``<cls>`` ...).
    min_cells
        Leave out candidates expressed in fewer cells (they would get no test).
    random_state
        Seed of the draw.

    Returns
    -------
    Sorted token ids.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> tokens = np.stack([rng.permutation(np.arange(4, 104)) for _ in range(20)])
    >>> background = rank_matched_background(
    ...     tokens, np.full(20, 100), np.arange(20), np.array([4, 5]), 10, special=np.arange(4)
    ... )
    >>> len(background), bool(np.isin([4, 5], background).any())
    (10, False)
    """
    genes, counts, mean_rank = token_profile(tokens, n_tokens, cells, special)
    present = np.isin(genes, listed)
    candidate = ~present & (counts >= min_cells)
    pool, pool_counts, pool_rank = genes[candidate], counts[candidate], mean_rank[candidate]
    rng = np.random.default_rng(random_state)
    if n_background <= 0 or len(pool) == 0:
        return np.empty(0, dtype=np.int64)
    if len(pool) <= n_background:
        return np.sort(pool).astype(np.int64)
    if not present.any():
        return np.sort(rng.choice(pool, size=n_background, replace=False)).astype(np.int64)

    def scaled(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
        spread = reference.std()
        return values / spread if spread > 0 else np.zeros_like(values)

    features = np.c_[scaled(pool_rank, pool_rank), scaled(np.log(pool_counts), np.log(pool_counts))]
    targets = np.c_[
        scaled(mean_rank[present], pool_rank), scaled(np.log(counts[present]), np.log(pool_counts))
    ]
    shares = np.full(len(targets), n_background // len(targets))
    shares[: n_background % len(targets)] += 1
    taken = np.zeros(len(pool), dtype=bool)
    for target, share in zip(targets[rng.permutation(len(targets))], shares, strict=True):
        distance = np.where(taken, np.inf, np.linalg.norm(features - target, axis=1))
        nearest = np.argsort(distance, kind="stable")[: 3 * share]
        nearest = nearest[np.isfinite(distance[nearest])]
        taken[rng.choice(nearest, size=min(share, len(nearest)), replace=False)] = True
    return np.sort(pool[taken]).astype(np.int64)
