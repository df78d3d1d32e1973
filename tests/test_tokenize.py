"""rank_tokenize: invariances, input layouts, result slots and bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scgeneformer as sgf

from .conftest import small_vocab

VOCAB = small_vocab(40)
HYPOTHESIS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def make_adata(counts: np.ndarray, n_extra_genes: int = 5) -> ad.AnnData:
    """Cells over the 40 vocabulary genes plus a few genes outside it."""
    names = VOCAB.genes[: counts.shape[1] - n_extra_genes] + [
        f"OUTSIDE{i}" for i in range(n_extra_genes)
    ]
    return ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])]),
        var=pd.DataFrame(index=names),
    )


def tokens_of(adata: ad.AnnData, **kwargs) -> list[list[int]]:
    out = sgf.pp.rank_tokenize(adata, VOCAB, copy=True, **kwargs)
    n = out.obs["geneformer_n_tokens"].to_numpy()
    return [out.obsm["geneformer_tokens"][i, : n[i]].tolist() for i in range(out.n_obs)]


counts_strategy = st.integers(min_value=1, max_value=12).flatmap(
    lambda n_cells: st.lists(
        st.lists(st.integers(0, 6), min_size=45, max_size=45).map(
            lambda row: [v if v < 4 else v * 7 for v in row]
        ),
        min_size=n_cells,
        max_size=n_cells,
    )
)


def _with_signal(rows) -> np.ndarray:
    counts = np.array(rows, dtype=np.int64)
    counts[:, 0] += 1  # every cell expresses at least one vocabulary gene
    return counts


@HYPOTHESIS
@given(rows=counts_strategy, seed=st.integers(0, 2**16))
def test_gene_order_does_not_matter(rows, seed):
    adata = make_adata(_with_signal(rows))
    permuted = adata[:, np.random.default_rng(seed).permutation(adata.n_vars)].copy()
    assert tokens_of(permuted) == tokens_of(adata)


@HYPOTHESIS
@given(rows=counts_strategy, factor=st.integers(2, 1000))
def test_scaling_a_cell_does_not_change_its_tokens(rows, factor):
    counts = _with_signal(rows)
    assert tokens_of(make_adata(counts * factor)) == tokens_of(make_adata(counts))


@HYPOTHESIS
@given(rows=counts_strategy)
def test_dense_csr_csc_and_backed_agree(rows, tmp_path_factory):
    adata = make_adata(_with_signal(rows))
    expected = tokens_of(adata)
    for layout in (np.asarray, sp.csc_matrix, sp.csr_array):
        other = adata.copy()
        other.X = layout(adata.X.toarray())
        assert tokens_of(other) == expected
    for matrix, name in ((adata.X, "csr"), (adata.X.toarray(), "dense")):
        path = tmp_path_factory.mktemp("backed") / f"{name}.h5ad"
        ad.AnnData(matrix, obs=adata.obs, var=adata.var).write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        try:
            sgf.pp.rank_tokenize(backed, VOCAB, chunk_size=3)
            n = backed.obs["geneformer_n_tokens"].to_numpy()
            got = [backed.obsm["geneformer_tokens"][i, : n[i]].tolist() for i in range(len(n))]
        finally:
            backed.file.close()
        assert got == expected


def test_chunking_and_threads_do_not_change_tokens():
    rng = np.random.default_rng(1)
    adata = make_adata(rng.poisson(2.0, size=(50, 45)))
    expected = tokens_of(adata)
    assert tokens_of(adata, chunk_size=7, n_jobs=1) == expected
    assert tokens_of(adata, chunk_size=1000, n_jobs=2) == expected


def test_ties_go_to_the_smaller_token_id():
    vocab = sgf.Vocabulary(
        {"ENSGA": 7, "ENSGB": 5, "ENSGC": 6}, {"ENSGA": 2.0, "ENSGB": 2.0, "ENSGC": 1.0}
    )
    adata = ad.AnnData(
        sp.csr_matrix(np.array([[3.0, 3.0, 1.0]])),
        var=pd.DataFrame(index=["ENSGA", "ENSGB", "ENSGC"]),
    )
    sgf.pp.rank_tokenize(adata, vocab)
    # A and B tie at 3/2; C's value is 1/1. Token 5 (B) precedes token 7 (A).
    assert adata.obsm["geneformer_tokens"][0].tolist() == [5, 7, 6]


def test_result_slots_and_cls_eos():
    counts = np.zeros((3, 45), dtype=np.int64)
    counts[0, [0, 1, 2]] = [5, 1, 3]
    counts[1, [3, 44]] = [2, 9]  # one vocabulary gene and one outside
    counts[2, 2] = 1
    adata = make_adata(counts)
    result = sgf.pp.rank_tokenize(adata, VOCAB)
    assert result is None
    tokens = adata.obsm["geneformer_tokens"]
    assert tokens.dtype == np.uint16
    n = adata.obs["geneformer_n_tokens"].to_numpy()
    np.testing.assert_array_equal(n, [5, 3, 3])
    assert tokens.shape == (3, 5)
    for i in range(3):
        assert tokens[i, 0] == VOCAB.cls_id and tokens[i, n[i] - 1] == VOCAB.eos_id
        assert np.all(tokens[i, n[i] :] == 0)
    assert tokens[1, 1] == VOCAB.token_dict[VOCAB.genes[3]]
    var_tokens = adata.var["geneformer_token"].to_numpy()
    assert (var_tokens[-5:] == -1).all() and (var_tokens[:40] >= 4).all()
    info = adata.uns["geneformer"]
    assert info["vocabulary_sha256"] == VOCAB.sha256
    assert info["n_genes_mapped"] == 40 and info["n_genes"] == 45


def test_max_length_truncates_keeping_top_genes():
    rng = np.random.default_rng(3)
    adata = make_adata(rng.poisson(3.0, size=(20, 45)) + 1)
    full = tokens_of(adata)
    cut = tokens_of(adata, max_length=7)
    for f, c in zip(full, cut, strict=True):
        assert len(c) == 7
        assert c[1:-1] == f[1:6] and c[-1] == VOCAB.eos_id


def test_total_key_overrides_cell_totals():
    rng = np.random.default_rng(4)
    adata = make_adata(rng.poisson(3.0, size=(10, 45)) + 1)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel() * 3.0
    # A common factor for every gene of a cell leaves the order, and so the tokens, unchanged.
    assert tokens_of(adata, total_key="n_counts") == tokens_of(adata)
    adata.obs["bad"] = -1.0
    with pytest.raises(ValueError, match="must be positive"):
        sgf.pp.rank_tokenize(adata, VOCAB, total_key="bad")


def test_copy_leaves_the_input_untouched():
    adata = make_adata(np.random.default_rng(5).poisson(2.0, size=(8, 45)) + 1)
    before = adata.copy()
    out = sgf.pp.rank_tokenize(adata, VOCAB, copy=True)
    assert "geneformer_tokens" in out.obsm
    assert_unchanged(adata, before)


def test_duplicate_gene_ids_are_summed():
    counts = np.array([[5.0, 0.0, 2.0, 2.0]])
    names = [VOCAB.genes[0], VOCAB.genes[1], VOCAB.genes[1] + ".3", VOCAB.genes[1].lower()]
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=names))
    with pytest.warns(UserWarning, match="summed"):
        sgf.pp.rank_tokenize(adata, VOCAB, max_length=4)
    med = VOCAB.median_by_token
    t0, t1 = VOCAB.token_dict[VOCAB.genes[0]], VOCAB.token_dict[VOCAB.genes[1]]
    first = t0 if 5.0 / med[t0] > 4.0 / med[t1] else t1
    assert adata.obsm["geneformer_tokens"][0, 1] == first
    assert adata.obs["geneformer_n_tokens"].iloc[0] == 4


@HYPOTHESIS
@given(rows=counts_strategy, seed=st.integers(0, 2**16))
def test_splitting_a_gene_over_duplicate_columns_changes_nothing(rows, seed):
    """Counts of a gene spread over columns that map to it (``ID``, ``ID.2``, ``id``) are
    summed per cell before ranking, whatever the split and the column order."""
    counts = _with_signal(rows)
    expected = tokens_of(make_adata(counts))
    rng = np.random.default_rng(seed)
    names = make_adata(counts).var_names
    columns, spread = [], []
    for j, name in enumerate(names):
        n_copies = rng.integers(1, 4) if j < 12 else 1
        cuts = np.sort(rng.integers(0, counts[:, j, None] + 1, size=(len(counts), n_copies - 1)))
        edges = np.hstack([np.zeros((len(counts), 1), int), cuts, counts[:, j, None]])
        for copy_index, part in enumerate(np.diff(edges, axis=1).T):
            columns.append([name, f"{name}.{copy_index}", name.lower()][copy_index])
            spread.append(part)
    order = rng.permutation(len(columns))
    split = ad.AnnData(
        sp.csr_matrix(np.array(spread).T[:, order].astype(np.float32)),
        var=pd.DataFrame(index=np.array(columns)[order]),
    )
    split.var_names_make_unique()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert tokens_of(split) == expected


def test_symbols_through_a_mapping():
    vocab = small_vocab(40, mapping={"GENEA": VOCAB.genes[0], "GENEB": VOCAB.genes[1]})
    adata = ad.AnnData(
        sp.csr_matrix(np.array([[1.0, 3.0, 7.0]])), var=pd.DataFrame(index=["GeneA", "geneb", "X"])
    )
    out = sgf.pp.rank_tokenize(adata, vocab, copy=True)
    assert out.var["geneformer_token"].tolist() == [4, 5, -1]
    assert out.obsm["geneformer_tokens"][0].tolist()[0] == vocab.cls_id


# ---------------------------------------------------------------- bad input


def assert_unchanged(adata: ad.AnnData, before: ad.AnnData) -> None:
    assert list(adata.obsm) == list(before.obsm)
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert list(adata.var.columns) == list(before.var.columns)
    assert dict(adata.uns) == dict(before.uns)
    np.testing.assert_array_equal(
        adata.X.toarray() if sp.issparse(adata.X) else adata.X,
        before.X.toarray() if sp.issparse(before.X) else before.X,
    )


def counts_with(value: float) -> ad.AnnData:
    counts = np.random.default_rng(0).poisson(2.0, size=(6, 45)).astype(np.float64) + 1
    counts[4, 2] = value
    return make_adata(counts)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-3.0, r"holds -3\.0 in cell 'cell4': negative values"),
        (0.6931, r"holds 0\.693.* in cell 'cell4': non-integer values.*layer="),
        (np.nan, r"holds nan in cell 'cell4': counts must be finite"),
        (np.inf, r"holds inf in cell 'cell4': counts must be finite"),
    ],
)
def test_non_count_input_is_refused(value, message):
    adata = counts_with(value)
    before = adata.copy()
    with pytest.raises(ValueError, match=message):
        sgf.pp.rank_tokenize(adata, VOCAB)
    assert_unchanged(adata, before)


def test_log_normalised_data_is_refused_with_layer_hint():
    adata = make_adata(np.random.default_rng(0).poisson(2.0, size=(6, 45)) + 1)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    before = adata.copy()
    with pytest.raises(ValueError, match=r"log-normalised.*layer='counts'"):
        sgf.pp.rank_tokenize(adata, VOCAB)
    assert_unchanged(adata, before)
    sgf.pp.rank_tokenize(adata, VOCAB, layer="counts")
    assert adata.uns["geneformer"]["layer"] == "counts"


def test_no_matching_gene_explains_and_suggests_gene_key():
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((3, 4))),
        var=pd.DataFrame({"ensembl": VOCAB.genes[:4]}, index=["CD3E", "MS4A1", "LYZ", "NKG7"]),
    )
    before = adata.copy()
    with pytest.raises(ValueError, match=r"None of the 4 genes.*CD3E.*ENSG.*gene_key"):
        sgf.pp.rank_tokenize(adata, VOCAB)
    assert_unchanged(adata, before)
    sgf.pp.rank_tokenize(adata, VOCAB, gene_key="ensembl")
    assert adata.uns["geneformer"]["n_genes_mapped"] == 4


def test_few_matching_genes_warn_with_the_fraction():
    counts = np.ones((3, 20))
    names = VOCAB.genes[:2] + [f"OTHER{i}" for i in range(18)]
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=names))
    with pytest.warns(UserWarning, match=r"Only 2 of 20 genes \(10\.0%\)"):
        sgf.pp.rank_tokenize(adata, VOCAB)


def test_cells_without_vocabulary_genes_are_kept_and_flagged():
    counts = np.zeros((4, 45))
    counts[:, 0] = [1, 0, 2, 0]
    counts[:, 44] = 5  # outside the vocabulary
    adata = make_adata(counts)
    with pytest.warns(UserWarning, match=r"2 of 4 cells express no vocabulary gene.*cell1"):
        sgf.pp.rank_tokenize(adata, VOCAB)
    assert adata.n_obs == 4
    np.testing.assert_array_equal(adata.obs["geneformer_n_tokens"], [3, 0, 3, 0])
    assert adata.uns["geneformer"]["n_cells_without_tokens"] == 2


def test_no_cells_is_refused_clearly():
    adata = make_adata(np.ones((3, 45)))[:0].copy()
    with pytest.raises(ValueError, match="no cells"):
        sgf.pp.rank_tokenize(adata, VOCAB)


def test_unknown_layer_and_gene_key():
    adata = make_adata(np.ones((2, 45)))
    adata.layers["raw"] = adata.X.copy()
    with pytest.raises(KeyError, match=r"layer='counts' is not in adata.layers.*\['raw'\]"):
        sgf.pp.rank_tokenize(adata, VOCAB, layer="counts")
    with pytest.raises(KeyError, match="gene_key='ids' is not a column"):
        sgf.pp.rank_tokenize(adata, VOCAB, gene_key="ids")
    assert "geneformer" not in adata.uns


def test_backed_copy_is_refused(tmp_path):
    path = tmp_path / "a.h5ad"
    make_adata(np.ones((2, 45))).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(ValueError, match="backed"):
            sgf.pp.rank_tokenize(backed, VOCAB, copy=True)
    finally:
        backed.file.close()


def test_long_runs_of_exact_ties_keep_the_tie_rule():
    """Equal medians and small counts tie hundreds of genes per cell in random token order,
    past the insertion fix-up's budget (the row is merge-sorted instead); the order is still
    value descending, then token id."""
    rng = np.random.default_rng(7)
    genes = [f"ENSG{i:011d}" for i in range(600)]
    token = {g: 4 + int(t) for g, t in zip(genes, rng.permutation(600), strict=True)}
    vocab = sgf.Vocabulary(
        token,
        dict.fromkeys(genes, 2.0),
        special_tokens={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3},
    )
    counts = rng.integers(0, 4, size=(6, 600)) * (rng.random((6, 600)) < 0.8)
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=genes))
    sgf.pp.rank_tokenize(adata, vocab)
    ids = np.array([token[g] for g in genes])
    for r in range(6):
        expressed = np.flatnonzero(counts[r])
        expected = ids[expressed][np.lexsort((ids[expressed], -counts[r, expressed]))]
        n = adata.obs["geneformer_n_tokens"].iloc[r]
        assert adata.obsm["geneformer_tokens"][r, 1 : n - 1].tolist() == expected.tolist()
