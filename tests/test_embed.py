"""tl.embed: exact against transformers, input order, scanpy chaining, gene embeddings."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
import transformers

import scgeneformer as sgf
from scgeneformer._plan import execution_plan
from scgeneformer.tl._inference import encode_cells

from .conftest import small_vocab

TINY = dict(
    num_hidden_layers=3,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)


def tiny_model(vocab, seed=0):
    return sgf.Geneformer.from_config("V1-10M", vocab, random_state=seed, **TINY)


def counts_adata(vocab, n_cells=40, seed=0, empty_rows=()):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.8, size=(n_cells, vocab.n_genes)) * (rng.random((n_cells, 1)) * 3 + 1)
    counts = np.floor(counts)
    counts[:, 0] += 1
    for r in empty_rows:
        counts[r] = 0
    return ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(
            {"group": rng.integers(0, 2, n_cells).astype(str)},
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=vocab.genes),
    )


def hand_embeddings(folder, tokens, n_tokens, layer_index, vocab):
    """Mean over gene tokens of transformers.BertModel's hidden state at layer_index."""
    bert = transformers.BertForMaskedLM.from_pretrained(folder, attn_implementation="eager").bert
    bert.eval()
    ids = torch.as_tensor(tokens.astype(np.int64))
    mask = (ids != 0).long()
    with torch.no_grad():
        states = bert(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    h = states[layer_index].numpy()
    special = list(vocab.special_tokens.values())
    out = np.empty((len(ids), h.shape[-1]))
    for i in range(len(ids)):
        row = tokens[i, : n_tokens[i]]
        keep = ~np.isin(row, special)
        out[i] = h[i, : n_tokens[i]][keep].mean(axis=0)
    return out


@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("layer", [-1, 0])
def test_embeddings_equal_hand_computation_in_any_order(tmp_path, cls, layer):
    vocab = small_vocab(30, cls=cls, max_length=64)
    model = tiny_model(vocab)
    folder = model.save(tmp_path / "model")
    adata = counts_adata(vocab)
    shuffled = adata[np.random.default_rng(1).permutation(adata.n_obs)].copy()
    sgf.tl.embed(shuffled, model, emb_layer=layer, token_budget=200)
    tokens = shuffled.obsm["geneformer_tokens"]
    n_tokens = shuffled.obs["geneformer_n_tokens"].to_numpy()
    expected = hand_embeddings(folder, tokens, n_tokens, model.num_layers + layer, vocab)
    np.testing.assert_allclose(shuffled.obsm["X_geneformer"], expected, rtol=1e-4, atol=1e-5)
    # The same cells embedded in their original order give the same rows.
    sgf.tl.embed(adata, model, emb_layer=layer)
    np.testing.assert_allclose(
        adata[shuffled.obs_names].obsm["X_geneformer"], shuffled.obsm["X_geneformer"], atol=1e-5
    )
    assert shuffled.uns["X_geneformer"]["emb_layer"] == layer


def test_cls_pooling_takes_the_first_token(tmp_path):
    vocab = small_vocab(30, cls=True, max_length=64)
    model = tiny_model(vocab)
    adata = counts_adata(vocab, n_cells=10)
    sgf.tl.embed(adata, model, pooling="cls", emb_layer=0)
    ids = torch.as_tensor(adata.obsm["geneformer_tokens"].astype(np.int64))
    with torch.no_grad():
        h = model.eval().hidden_states(ids, ids != 0, layer=-1)[:, 0].numpy()
    np.testing.assert_allclose(adata.obsm["X_geneformer"], h, atol=1e-5)


def test_packed_path_equals_padded_path():
    vocab = small_vocab(30, cls=True, max_length=64)
    model = tiny_model(vocab)
    adata = counts_adata(vocab, n_cells=25)
    sgf.pp.rank_tokenize(adata, vocab)
    tokens, n = adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"].to_numpy()
    args = dict(emb_layer=-1, pooling="mean", plan=execution_plan("cpu", "float32"))
    padded = encode_cells(model, tokens, n, packed=False, genes=True, **args)
    packed = encode_cells(model, tokens, n, packed=True, genes=True, token_budget=150, **args)
    np.testing.assert_allclose(packed.cells, padded.cells, atol=1e-5)
    np.testing.assert_allclose(packed.gene_sum, padded.gene_sum, atol=1e-4)
    np.testing.assert_array_equal(packed.gene_count, padded.gene_count)


def test_gene_embeddings_average_over_cells():
    vocab = small_vocab(30, cls=False, max_length=64)
    model = tiny_model(vocab)
    adata = counts_adata(vocab, n_cells=20)
    adata.var_names = [*adata.var_names[:-1], "NOT_IN_VOCAB"]
    sgf.tl.embed(adata, model, genes=True, emb_layer=0)
    gene = adata.var_names[3]
    token = adata.var.loc[gene, "geneformer_token"]
    tokens = adata.obsm["geneformer_tokens"]
    ids = torch.as_tensor(tokens.astype(np.int64))
    with torch.no_grad():
        h = model.eval().hidden_states(ids, ids != 0, layer=-1).numpy()
    rows, cols = np.nonzero(tokens == token)
    np.testing.assert_allclose(adata.varm["X_geneformer"][3], h[rows, cols].mean(0), atol=1e-5)
    assert adata.var.loc[gene, "X_geneformer_n_cells"] == len(rows)
    assert np.isnan(adata.varm["X_geneformer"][-1]).all()
    assert adata.var["X_geneformer_n_cells"].iloc[-1] == 0


def test_scanpy_chains_on_the_output():
    vocab = small_vocab(30, cls=True, max_length=64)
    adata = counts_adata(vocab, n_cells=60)
    sgf.tl.embed(adata, tiny_model(vocab))
    assert adata.obsm["X_geneformer"].shape == (60, 32)
    sc.pp.neighbors(adata, use_rep="X_geneformer", n_neighbors=10)
    # The graph is the embedding's own 10 nearest neighbours (itself included), cell by cell.
    from sklearn.neighbors import NearestNeighbors

    knn = NearestNeighbors(n_neighbors=10).fit(adata.obsm["X_geneformer"])
    expected = knn.kneighbors(return_distance=False)[:, :9]
    graph = adata.obsp["distances"].tocsr()
    for cell in range(adata.n_obs):
        assert set(graph[cell].indices) == set(expected[cell]), cell
    sc.tl.umap(adata)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)
    assert adata.obsm["X_umap"].shape == (60, 2)
    sizes = adata.obs["leiden"].value_counts()
    assert len(sizes) >= 2 and sizes.sum() == 60  # a partition, not one block


def test_cells_without_tokens_get_nan_rows_and_a_warning():
    vocab = small_vocab(30, cls=True, max_length=64)
    adata = counts_adata(vocab, n_cells=12, empty_rows=(2, 7))
    with pytest.warns(UserWarning, match="express no vocabulary gene"):
        sgf.pp.rank_tokenize(adata, vocab)
    with pytest.warns(UserWarning, match="2 cells have no tokens"):
        sgf.tl.embed(adata, tiny_model(vocab))
    emb = adata.obsm["X_geneformer"]
    assert np.isnan(emb[[2, 7]]).all() and np.isfinite(np.delete(emb, [2, 7], axis=0)).all()


def test_copy_returns_new_and_tokenizes_only_the_copy():
    vocab = small_vocab(30, cls=True, max_length=64)
    adata = counts_adata(vocab, n_cells=8)
    out = sgf.tl.embed(adata, tiny_model(vocab), copy=True)
    assert "X_geneformer" in out.obsm and "geneformer_tokens" in out.obsm
    assert "X_geneformer" not in adata.obsm and "geneformer_tokens" not in adata.obsm


def test_bad_input_is_refused_and_adata_unchanged():
    vocab = small_vocab(30, cls=False, max_length=64)
    other = small_vocab(30, cls=False, seed=5, max_length=64, name="other")
    adata = counts_adata(vocab, n_cells=8)
    sgf.pp.rank_tokenize(adata, other)
    before = set(adata.obsm), set(adata.uns)
    model = tiny_model(vocab)
    with pytest.raises(ValueError, match=r"made with vocabulary 'other'.*again with model\.vocab"):
        sgf.tl.embed(adata, model)
    with pytest.raises(ValueError, match=r"emb_layer=-4 is out of range.*3 layers"):
        sgf.tl.embed(adata, model, emb_layer=-4)
    with pytest.raises(ValueError, match=r"emb_layer=1 is out of range"):
        sgf.tl.embed(adata, model, emb_layer=1)
    with pytest.raises(ValueError, match="pooling='cls' needs a <cls> token"):
        sgf.tl.embed(adata, model, pooling="cls")
    with pytest.raises(ValueError, match="pooling must be one of"):
        sgf.tl.embed(adata, model, pooling="max")
    assert (set(adata.obsm), set(adata.uns)) == before


def knn_accuracy(embedding: np.ndarray, labels) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return cross_val_score(KNeighborsClassifier(10), embedding, labels, cv=5).mean()


def test_pbmc3k_brief_pretraining_beats_random_weights(pbmc3k, tmp_path):
    """kNN cell-type accuracy of the embeddings: briefly pretrained vs the same random init.

    Measured on this machine (600 steps, about a minute): random 0.54, pretrained 0.66.
    """
    adata = pbmc3k.copy()
    vocab = sgf.Vocabulary.build(adata, min_cells=50, max_length=128)
    sgf.pp.rank_tokenize(adata, vocab)
    sizes = dict(TINY, num_hidden_layers=2, hidden_size=64, max_position_embeddings=128)
    random_model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **sizes)
    sgf.tl.embed(adata, random_model)
    random_accuracy = knn_accuracy(adata.obsm["X_geneformer"], adata.obs["cell_type"])
    trained = sgf.tl.pretrain(
        adata,
        sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **sizes),
        output_dir=tmp_path / "run",
        max_steps=600,
        warmup_steps=20,
        lr=4e-3,
        token_budget=4096,
        save_every=10_000,
        log_every=100,
    )
    sgf.tl.embed(adata, trained)
    trained_accuracy = knn_accuracy(adata.obsm["X_geneformer"], adata.obs["cell_type"])
    assert trained_accuracy > random_accuracy + 0.06, (random_accuracy, trained_accuracy)


def test_old_keywords_layer_and_batch_tokens_still_work_with_a_warning():
    vocab = small_vocab(30, cls=False, max_length=64)
    adata = counts_adata(vocab, n_cells=8)
    model = tiny_model(vocab)
    sgf.tl.embed(adata, model, emb_layer=0, token_budget=64, key_added="new")
    with pytest.warns(FutureWarning, match=r"embed\(layer=\.\.\.\) is renamed embed\(emb_layer"):
        sgf.tl.embed(adata, model, layer=0, key_added="old")
    with pytest.warns(FutureWarning, match=r"batch_tokens=\.\.\.\) is renamed"):
        sgf.tl.embed(adata, model, emb_layer=0, batch_tokens=64, key_added="old_budget")
    np.testing.assert_array_equal(adata.obsm["old"], adata.obsm["new"])
    np.testing.assert_array_equal(adata.obsm["old_budget"], adata.obsm["new"])
    assert adata.uns["old"]["emb_layer"] == 0
    with pytest.raises(TypeError, match="got both emb_layer= and its old name layer="):
        sgf.tl.embed(adata, model, layer=0, emb_layer=-1)
