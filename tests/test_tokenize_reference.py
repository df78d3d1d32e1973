"""rank_tokenize against a plain per-cell numpy implementation of Geneformer's algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import scgeneformer as sgf
from scgeneformer._safe_pickle import load_plain_dict

from .conftest import shared_file


def reference_tokens(adata, tokens: dict, medians: dict, mapping: dict | None, max_genes: int):
    """Per cell: sum counts per canonical gene, value = c / total * 1e4 / median, sort, cut.

    Returns, per cell, the tokens in our tie order (token id ascending among equal values) and
    the values sorted the way Geneformer's ``np.argsort(-values)`` orders them.
    """
    canonical = []
    for name in adata.var_names:
        key = name.upper()
        target = mapping.get(key) if mapping is not None else key
        canonical.append(target if target in tokens else None)
    col_token = np.array([tokens[c] if c is not None else -1 for c in canonical])
    col_median = np.array([medians[c] if c is not None else np.nan for c in canonical])
    X = sp.csr_matrix(adata.X)
    ours, values_sorted = [], []
    for r in range(X.shape[0]):
        lo, hi = X.indptr[r], X.indptr[r + 1]
        idx, counts = X.indices[lo:hi], X.data[lo:hi].astype(np.float64)
        total = counts.sum()
        keep = col_token[idx] >= 0
        toks, first, inverse = np.unique(
            col_token[idx][keep], return_index=True, return_inverse=True
        )
        summed = np.bincount(inverse, weights=counts[keep])
        med = col_median[idx][keep][first]
        nz = summed > 0
        toks, vals = toks[nz], ((summed[nz] / total) * 10_000) / med[nz]
        order = np.lexsort((toks, -vals))[:max_genes]
        ours.append(toks[order])
        values_sorted.append(vals[np.argsort(-vals)][:max_genes])
    return ours, values_sorted, col_token


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pbmc3k_matches_reference(version, pbmc3k, vocab_v1, vocab_v2):
    suffix = "gc30M" if version == "v1" else "gc95M"
    tokens = load_plain_dict(shared_file("geneformer_ref", f"token_dictionary_{suffix}.pkl"))
    medians = load_plain_dict(shared_file("geneformer_ref", f"gene_median_dictionary_{suffix}.pkl"))
    mapping = None
    vocab = vocab_v1
    if version == "v2":
        mapping = load_plain_dict(shared_file("geneformer_ref", "ensembl_mapping_dict_gc95M.pkl"))
        vocab = vocab_v2
    # A short maximum exercises truncation on every cell; the full length, the common case.
    for max_length in (vocab.max_length, 300):
        if version == "v2":
            # 251 PBMC genes collapse onto another column's vocabulary gene under V2's map.
            with pytest.warns(UserWarning, match="251 genes map to a vocabulary gene"):
                out = sgf.pp.rank_tokenize(pbmc3k, vocab, max_length=max_length, copy=True)
        else:
            out = sgf.pp.rank_tokenize(pbmc3k, vocab, max_length=max_length, copy=True)
        max_genes = max_length - (2 if vocab.has_cls else 0)
        expected, _, col_token = reference_tokens(pbmc3k, tokens, medians, mapping, max_genes)
        got = out.obsm["geneformer_tokens"]
        n_tokens = out.obs["geneformer_n_tokens"].to_numpy()
        assert got.shape[1] <= max_length
        np.testing.assert_array_equal(out.var["geneformer_token"].to_numpy(), col_token)
        for r in range(pbmc3k.n_obs):
            row = got[r, : n_tokens[r]].astype(np.int64)
            assert np.all(got[r, n_tokens[r] :] == 0)
            if vocab.has_cls:
                assert row[0] == vocab.cls_id and row[-1] == vocab.eos_id
                row = row[1:-1]
            np.testing.assert_array_equal(row, expected[r])
        assert n_tokens.max() <= max_length


def test_pbmc3k_values_follow_geneformer_sort(pbmc3k, vocab_v1):
    """Along our order, values are exactly Geneformer's argsort(-values) order (ties aside)."""
    tokens = load_plain_dict(shared_file("geneformer_ref", "token_dictionary_gc30M.pkl"))
    medians = load_plain_dict(shared_file("geneformer_ref", "gene_median_dictionary_gc30M.pkl"))
    subset = pbmc3k[:300].copy()
    out = sgf.pp.rank_tokenize(subset, vocab_v1, copy=True)
    _, expected_values, col_token = reference_tokens(subset, tokens, medians, None, 2048)
    column_of_token = np.full(vocab_v1.size, -1)
    column_of_token[col_token[col_token >= 0]] = np.flatnonzero(col_token >= 0)
    median_of_token = vocab_v1.median_by_token
    X = sp.csr_matrix(subset.X)
    for r in range(subset.n_obs):
        row = out.obsm["geneformer_tokens"][r, : out.obs["geneformer_n_tokens"].iloc[r]]
        counts = X[r].toarray().ravel()[column_of_token[row]].astype(np.float64)
        values = ((counts / X[r].sum()) * 10_000) / median_of_token[row]
        np.testing.assert_array_equal(values, expected_values[r])
