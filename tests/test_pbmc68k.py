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


def test_tokens_with_the_original_totals_rank_like_scanpys_values():
    adata = sgf.datasets.pbmc68k_reduced()
    vocab = sgf.Vocabulary.build(adata)
    sgf.pp.rank_tokenize(adata, vocab, total_key="n_counts")
    n = adata.obs["geneformer_n_tokens"].to_numpy()
    assert np.array_equal(n - 2, (adata.X > 0).sum(axis=1).A1)
    # The top gene of a cell is its highest count over median, whatever the total.
    med = vocab.median_by_token[adata.var["geneformer_token"].to_numpy()]
    cell = adata.X[0].toarray().ravel()
    assert (
        adata.obsm["geneformer_tokens"][0, 1]
        == adata.var["geneformer_token"].iloc[int(np.argmax(np.where(cell > 0, cell / med, -1)))]
    )
