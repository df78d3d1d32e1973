"""datasets.pbmc68k_reduced: scanpy's bundled subset inverted to raw counts."""

from __future__ import annotations

import numpy as np
import scanpy as sc
from scipy import sparse

import scgeneformer as sgf


def test_counts_invert_scanpys_normalisation():
    adata = sgf.datasets.pbmc68k_reduced()
    bundled = sc.datasets.pbmc68k_reduced()
    assert adata.shape == (700, 765)
    counts = adata.X.toarray()
    assert np.all(counts == np.round(counts)) and counts.min() == 0
    # Normalising the counts again gives back scanpy's stored values, to their 3 decimals.
    totals = adata.obs["n_counts"].to_numpy()[:, None]
    again = np.log1p(counts / totals * 1e4)
    stored = sparse.csr_matrix(bundled.raw.X).toarray()
    np.testing.assert_allclose(again, stored, atol=6e-4)
    assert list(adata.var_names) == list(bundled.raw.var_names)
    assert adata.obs["bulk_labels"].nunique() == 10


def test_original_totals_order_ties_as_geneformer_would_on_the_full_data():
    """With total_key="n_counts" every cell's tokens follow Geneformer's float64 values
    count / n_counts * 10,000 / median (ties by token id); the 765-gene sums order some
    equal count / median pairs differently, through rounding."""
    adata = sgf.datasets.pbmc68k_reduced()
    vocab = sgf.Vocabulary.build(adata)
    sgf.pp.rank_tokenize(adata, vocab, total_key="n_counts")
    own_sums = sgf.pp.rank_tokenize(adata, vocab, copy=True)
    tokens = adata.obsm["geneformer_tokens"]
    assert (own_sums.obsm["geneformer_tokens"] != tokens).any()
    token = adata.var["geneformer_token"].to_numpy()
    median = vocab.median_by_token[token]
    counts = adata.X.toarray().astype(np.float64)
    totals = adata.obs["n_counts"].to_numpy()
    n = adata.obs["geneformer_n_tokens"].to_numpy()
    for r in range(adata.n_obs):
        genes = np.flatnonzero(counts[r])
        values = ((counts[r, genes] / totals[r]) * 10_000) / median[genes]
        expected = token[genes][np.lexsort((token[genes], -values))]
        assert tokens[r, 1 : n[r] - 1].tolist() == expected.tolist()
