"""Geneformer's own screen statistics, from a screen's per-cell shifts, under Geneformer's names.

Geneformer's ``InSilicoPerturberStats`` reports, in its ``goal_state_shift`` mode, each gene's
mean shift toward the goal and a two-sided Wilcoxon rank-sum test of its per-cell shifts
against the per-cell shifts of every perturbation in the screen pooled together (at most
100,000 of them, drawn at random), with Benjamini-Hochberg FDR; in its ``vs_null`` mode, the
same test of a gene's shifts against the same gene's shifts in a second, null screen; and in
``aggregate_gene_shifts``, the mean, standard deviation and count of each (perturbed,
affected gene) shift. These are computed here from the per-cell layer
(``store_per_cell=True``) so that a screen can be set beside a published Geneformer table.
They test cells, not genes, so their p-values shrink with every cell and do not carry the
calibration of :func:`~scgeneformer.tl.in_silico_delete`'s own ``_pval`` and ``_fdr``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

MODES = ("goal_state_shift", "vs_null")


def ranksums_pvalues(pool: np.ndarray, samples: list[np.ndarray]) -> np.ndarray:
    """Two-sided Wilcoxon rank-sum p-value of each sample against one pool.

    The normal approximation with mid-ranks and no tie correction, as
    :func:`scipy.stats.ranksums`; the pool is sorted once and each sample placed in it by
    binary search. NaN where a side is empty.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> pool, sample = rng.normal(size=300), rng.normal(0.3, 1, size=20)
    >>> mine = ranksums_pvalues(pool, [sample])[0]
    >>> bool(np.isclose(mine, stats.ranksums(pool, sample).pvalue))
    True
    """
    ordered = np.sort(pool)
    n1 = len(ordered)
    out = np.full(len(samples), np.nan)
    for i, sample in enumerate(samples):
        n2 = len(sample)
        if n1 == 0 or n2 == 0:
            continue
        below = np.searchsorted(ordered, sample, side="left")
        equal = np.searchsorted(ordered, sample, side="right") - below
        # Ranks of the sample in the pool and itself together: pool values below it, half the
        # ties, and its own within-sample ranks (which sum to n2 (n2 + 1) / 2).
        sample_rank_sum = (below + 0.5 * equal).sum() + n2 * (n2 + 1) / 2
        pool_rank_sum = (n1 + n2) * (n1 + n2 + 1) / 2 - sample_rank_sum
        expected = n1 * (n1 + n2 + 1) / 2
        z = (pool_rank_sum - expected) / np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
        out[i] = 2 * stats.norm.sf(abs(z))
    return out


def _per_cell(adata: AnnData, key: str) -> sp.csc_matrix:
    if key not in adata.layers:
        raise KeyError(
            f"adata.layers has no {key!r}: Geneformer's statistics need the per-cell shifts; "
            f"run the screen with key_added={key!r} and store_per_cell=True."
        )
    return sp.csc_matrix(adata.layers[key])


def _columns(matrix: sp.csc_matrix) -> list[np.ndarray]:
    """Each gene's stored per-cell shifts (the sparsity pattern, explicit zeros included)."""
    return [matrix.data[matrix.indptr[j] : matrix.indptr[j + 1]] for j in range(matrix.shape[1])]


def _bh(pvalues: np.ndarray) -> np.ndarray:
    return stats.false_discovery_control(np.where(np.isnan(pvalues), 1.0, pvalues), method="bh")


def _gene_table(adata: AnnData, keep: np.ndarray) -> pd.DataFrame:
    symbols = adata.var["gene_symbol"] if "gene_symbol" in adata.var.columns else adata.var_names
    table = pd.DataFrame(index=adata.var_names[keep])
    table["Gene"] = adata.var["geneformer_token"].to_numpy()[keep]
    table["Gene_name"] = np.asarray(symbols, dtype=str)[keep]
    table["Ensembl_ID"] = adata.var_names[keep].to_numpy()
    return table


def perturbation_stats(
    adata: AnnData,
    key: str = "in_silico_delete",
    *,
    mode: str = "goal_state_shift",
    null: AnnData | None = None,
    null_key: str | None = None,
    max_pool: int = 100_000,
    random_state: int = 42,
) -> pd.DataFrame:
    """Geneformer's ``goal_state_shift`` or ``vs_null`` table of a screen, by its column names.

    Parameters
    ----------
    adata
        AnnData with a screen run with ``store_per_cell=True``.
    key
        The screen's ``key_added`` (its per-cell shifts are ``layers[key]``).
    mode
        ``"goal_state_shift"``: each gene's shifts against all of the screen's shifts pooled
        (``Shift_to_goal_end``, ``Goal_end_vs_random_pval``, ``Goal_end_FDR``,
        ``N_Detections``). ``"vs_null"``: each gene's shifts against the same gene's shifts
        in a null screen, such as the same deletions in control cells (``Test_avg_shift``,
        ``Null_avg_shift``, ``Test_vs_null_avg_shift``, ``Test_vs_null_pval``,
        ``Test_vs_null_FDR``, ``N_Detections_test``, ``N_Detections_null``).
    null, null_key
        With ``mode="vs_null"``: the AnnData holding the null screen (default ``adata``, with
        genes matched by ``var_names``) and its key.
    max_pool
        ``goal_state_shift`` draws at most this many pooled shifts, as Geneformer does.
    random_state
        Seed of that draw.

    Returns
    -------
    One row per gene with shifts, indexed by ``var_names``, with ``Gene`` (token),
    ``Gene_name``, ``Ensembl_ID`` and ``Sig`` (FDR < 0.05), in Geneformer's order: significant
    first, then by mean shift, largest first. P-values are two-sided, like Geneformer's; a
    gene's shifts enter its own pool, as there.

    Examples
    --------
    >>> sgf.tl.in_silico_delete(
    ...     adata, model, state_key="condition", start_state="stim", goal_state="ctrl",
    ...     store_per_cell=True,
    ... )  # doctest: +SKIP
    >>> sgf.tl.perturbation_stats(adata).head()  # doctest: +SKIP
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    test = _columns(_per_cell(adata, key))
    n_test = np.array([len(c) for c in test])
    keep = n_test > 0
    table = _gene_table(adata, keep)
    mean_test = np.array([c.mean() if len(c) else np.nan for c in test])[keep]
    if mode == "goal_state_shift":
        pool = np.concatenate(test) if test else np.empty(0)
        if len(pool) > max_pool:
            pool = np.random.default_rng(random_state).choice(pool, max_pool, replace=False)
        pval = ranksums_pvalues(pool, [c for c, k in zip(test, keep, strict=True) if k])
        table["Shift_to_goal_end"] = mean_test
        table["Goal_end_vs_random_pval"] = pval
        table["Goal_end_FDR"] = _bh(pval)
        table["N_Detections"] = n_test[keep]
        fdr, shift = "Goal_end_FDR", "Shift_to_goal_end"
    else:
        if null_key is None:
            raise ValueError("mode='vs_null' needs null_key, the key of the null screen.")
        null = adata if null is None else null
        null_matrix = _per_cell(null, null_key)
        at = pd.Index(null.var_names).get_indexer(adata.var_names[keep])
        null_columns = _columns(null_matrix)
        empty = np.empty(0)
        null_shifts = [null_columns[j] if j >= 0 else empty for j in at]
        test_shifts = [c for c, k in zip(test, keep, strict=True) if k]
        pval = np.array(
            [ranksums_pvalues(n, [t])[0] for t, n in zip(test_shifts, null_shifts, strict=True)]
        )
        mean_null = np.array([n.mean() if len(n) else np.nan for n in null_shifts])
        table["Test_avg_shift"] = mean_test
        table["Null_avg_shift"] = mean_null
        table["Test_vs_null_avg_shift"] = mean_test - mean_null
        table["Test_vs_null_pval"] = np.where(np.isnan(pval), 1.0, pval)
        table["Test_vs_null_FDR"] = _bh(pval)
        table["N_Detections_test"] = n_test[keep]
        table["N_Detections_null"] = [len(n) for n in null_shifts]
        fdr, shift = "Test_vs_null_FDR", "Test_vs_null_avg_shift"
    table["Sig"] = (table[fdr] < 0.05).astype(int)
    return table.sort_values(["Sig", shift, fdr], ascending=[False, False, True])


def aggregate_gene_shifts(
    perturbed: np.ndarray, affected: np.ndarray, shift: np.ndarray
) -> pd.DataFrame:
    """Geneformer's ``aggregate_gene_shifts``: each (perturbed, affected) pair's shifts summarised.

    Parameters
    ----------
    perturbed, affected, shift
        One entry per (cell, perturbed gene, affected gene): the two genes' tokens (or names)
        and the shift of the affected gene's embedding.

    Returns
    -------
    ``Perturbed``, ``Affected``, ``Cosine_sim_mean``, ``Cosine_sim_stdev`` (population
    standard deviation, as numpy's default) and ``N_Detections``, by mean, smallest first.

    Examples
    --------
    >>> aggregate_gene_shifts(np.array([5, 5, 5]), np.array([7, 7, 8]), np.array([0.2, 0.4, 0.1]))
       Perturbed  Affected  Cosine_sim_mean  Cosine_sim_stdev  N_Detections
    1          5         8              0.1               0.0             1
    0          5         7              0.3               0.1             2
    """
    frame = pd.DataFrame({"Perturbed": perturbed, "Affected": affected, "shift": shift})
    grouped = frame.groupby(["Perturbed", "Affected"], sort=True)["shift"]
    out = grouped.agg(
        Cosine_sim_mean="mean",
        Cosine_sim_stdev=lambda values: float(np.std(values)),
        N_Detections="size",
    ).reset_index()
    return out.sort_values("Cosine_sim_mean", kind="stable")
