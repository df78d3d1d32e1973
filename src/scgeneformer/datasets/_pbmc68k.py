"""A small real data set that needs no download: scanpy's bundled PBMC 68k subset, as counts."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scipy import sparse

# scanpy stores log1p(count / n_counts * 10,000) rounded to three decimals; inverting that is
# off an integer by at most about 0.08 on this file. Anything near 0.5 would mean the file no
# longer holds what this loader assumes.
_MAX_ROUNDING = 0.25
_TARGET_SUM = 10_000.0


def pbmc68k_reduced() -> AnnData:
    """700 PBMCs over 765 highly variable genes, with cell-type labels, as raw counts.

    scanpy ships this subset of 10x Genomics' PBMC 68k (Zheng et al. 2017) inside its package,
    so it loads offline. Its ``.raw`` holds ``log1p(count / n_counts * 10,000)`` rounded to
    three decimals; this loader inverts that back to the integer counts (it checks that every
    value lands within 0.25 of an integer) so that they can be rank-value tokenized.

    Only 765 genes are kept, so a cell's total count is not the sum of its genes here;
    ``obs["n_counts"]`` holds the original totals. The total changes a cell's token order only
    where two genes' count / median are equal, through the float64 rounding of Geneformer's
    ``count / total * 10,000 / median``; pass ``total_key="n_counts"`` to
    :func:`~scgeneformer.pp.rank_tokenize` to order those as on the full data. Medians
    computed here with :meth:`~scgeneformer.Vocabulary.build` normalise by the 765-gene sums.
    Genes are symbols: tokenize with a vocabulary that maps symbols (the official
    ``gene_name_id_dict_*.pkl``) or one built on these symbols.

    Returns
    -------
    AnnData with ``X`` the counts (CSR, float32 integers); ``obs`` with ``bulk_labels`` (10
    sorted cell types), ``louvain``, ``n_counts``, ``n_genes``, ``percent_mito`` and cell-cycle
    scores; ``obsm["X_umap"]`` from scanpy's processing.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> adata = sgf.datasets.pbmc68k_reduced()
    >>> adata.shape
    (700, 765)
    >>> vocab = sgf.Vocabulary.build(adata)  # doctest: +SKIP
    >>> sgf.pp.rank_tokenize(adata, vocab, total_key="n_counts")  # doctest: +SKIP
    """
    import scanpy as sc

    bundled = sc.datasets.pbmc68k_reduced()
    counts = sparse.csr_matrix(bundled.raw.X, dtype=np.float64, copy=True)
    totals = bundled.obs["n_counts"].to_numpy(dtype=np.float64)
    counts.data = np.expm1(counts.data) * np.repeat(totals, np.diff(counts.indptr)) / _TARGET_SUM
    off = np.abs(counts.data - np.round(counts.data)).max(initial=0.0)
    if off > _MAX_ROUNDING:
        raise ValueError(
            f"scanpy's pbmc68k_reduced no longer inverts to integer counts (off by up to "
            f"{off:.2f}); this loader needs updating for scanpy {sc.__version__}."
        )
    counts.data = np.round(counts.data)
    counts.eliminate_zeros()
    return AnnData(
        X=counts.astype(np.float32),
        obs=bundled.obs.copy(),
        var=bundled.raw.var.copy(),
        obsm={"X_umap": bundled.obsm["X_umap"].copy()},
        uns={
            "source": "scanpy.datasets.pbmc68k_reduced(): .raw inverted to counts with "
            "obs['n_counts'] (10x Genomics PBMC 68k, Zheng et al. 2017)"
        },
    )
