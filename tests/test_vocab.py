"""Vocabulary: official dictionaries, safe pickles, our JSON format and corpus medians."""

from __future__ import annotations

import os
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scgeneformer as sgf
from scgeneformer._safe_pickle import UnsafePickleError, load_plain_dict

from .conftest import shared_file, small_vocab


def test_official_v1_and_v2_are_told_apart(vocab_v1, vocab_v2):
    assert not vocab_v1.has_cls and vocab_v1.cls_id is None
    assert (vocab_v1.pad_id, vocab_v1.mask_id, len(vocab_v1), vocab_v1.max_length) == (
        0,
        1,
        25_426,
        2048,
    )
    assert vocab_v2.has_cls and (vocab_v2.cls_id, vocab_v2.eos_id) == (2, 3)
    assert (len(vocab_v2), vocab_v2.n_genes, vocab_v2.max_length) == (20_275, 20_271, 4096)
    assert vocab_v1.sha256 != vocab_v2.sha256
    # V2 genes take ids 4.. in sorted Ensembl order, as the official dictionary does.
    assert vocab_v2.genes == sorted(vocab_v2.genes)
    np.testing.assert_array_equal(vocab_v2.gene_token_ids, np.arange(4, 20_275))


def test_official_mapping_resolves_symbols_and_versions(vocab_v2):
    resolved = vocab_v2.resolve(["ISG15", "ENSG00000187608.10", "isg15", "NOT_A_GENE"])
    assert resolved[0] == resolved[1] == resolved[2] == "ENSG00000187608"
    assert resolved[3] is None


def test_v1_symbols_through_gene_name_dict(vocab_v1):
    vocab = sgf.Vocabulary.from_geneformer(
        shared_file("geneformer_ref", "token_dictionary_gc30M.pkl"),
        shared_file("geneformer_ref", "gene_median_dictionary_gc30M.pkl"),
        shared_file("geneformer_ref", "gene_name_id_dict_gc30M.pkl"),
    )
    assert vocab == vocab_v1  # the mapping is not part of the identity
    assert vocab.tokens_for(["CD3E"])[0] == vocab_v1.token_dict["ENSG00000198851"]


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_save_load_round_trip(tmp_path, vocab_v2, suffix):
    path = vocab_v2.save(tmp_path / f"vocab{suffix}")
    loaded = sgf.Vocabulary.load(path)
    assert loaded == vocab_v2 and loaded.sha256 == vocab_v2.sha256
    assert loaded.name == vocab_v2.name and loaded.max_length == 4096
    assert loaded.mapping == vocab_v2.mapping
    np.testing.assert_array_equal(loaded.median_by_token[4:], vocab_v2.median_by_token[4:])


def test_sha256_tracks_medians_and_tokens():
    base = small_vocab(10)
    assert small_vocab(10) == base
    assert small_vocab(10, seed=1).sha256 != base.sha256  # other medians
    assert small_vocab(10, cls=False).sha256 != base.sha256  # other token ids
    assert small_vocab(10, name="renamed") == base


def test_tampered_or_truncated_file_is_refused(tmp_path):
    path = small_vocab(10).save(tmp_path / "v.json")
    text = path.read_text()
    tampered = text.replace('"medians": [', '"medians": [1', 1)
    path.write_text(tampered)
    with pytest.raises(ValueError, match="sha256"):
        sgf.Vocabulary.load(path)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated"):
        sgf.Vocabulary.load(path)


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG1": Hostile()}))
    with pytest.raises(UnsafePickleError, match=r"asks to load '(posix|os|nt)\.system'"):
        sgf.Vocabulary.from_geneformer(path, path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps([1, 2, 3]), "holds a list, not a dict"),
        (pickle.dumps({"ENSG1": [1, 2]}), "only string keys with string or number values"),
        (pickle.dumps({"ENSG1": 1})[:-3], "could not be read as a pickle"),
    ],
)
def test_unreadable_or_odd_pickles(tmp_path, payload, message):
    path = tmp_path / "d.pkl"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message):
        load_plain_dict(path)


def test_missing_pickle_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"median dictionary file .*nope\.pkl"):
        load_plain_dict(tmp_path / "nope.pkl", what="median dictionary")


def test_invalid_vocabularies_are_refused():
    with pytest.raises(ValueError, match="have no median"):
        sgf.Vocabulary({"ENSG1": 2}, {})
    with pytest.raises(ValueError, match="distinct"):
        sgf.Vocabulary({"ENSG1": 1}, {"ENSG1": 1.0})
    with pytest.raises(ValueError, match="positive and finite"):
        sgf.Vocabulary({"ENSG1": 2}, {"ENSG1": 0.0})


# ---------------------------------------------------------------- Vocabulary.build


def corpus(seed: int, n_cells: int, genes: list[str]) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(1, 0.3, size=(n_cells, len(genes))) * (
        rng.random((n_cells, len(genes))) < 0.4
    )
    counts[:, 0] += 1
    return ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=[f"s{seed}_c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )


def expected_medians(adatas: list[ad.AnnData]) -> dict[str, float]:
    values: dict[str, list[np.ndarray]] = {}
    for a in adatas:
        dense = a.X.toarray().astype(np.float64)
        cp10k = (dense / dense.sum(axis=1, keepdims=True)) * 10_000
        for j, g in enumerate(a.var_names):
            values.setdefault(g, []).append(cp10k[:, j][cp10k[:, j] > 0])
    return {g: float(np.median(np.concatenate(v))) for g, v in values.items()}


def test_build_medians_are_exact_over_streamed_files(tmp_path):
    genes_a = [f"ENSG{i:011d}" for i in range(30)]
    genes_b = [f"ENSG{i:011d}" for i in range(10, 45)]  # overlapping, with new genes
    parts = [corpus(0, 57, genes_a), corpus(1, 41, genes_b), corpus(2, 23, genes_a)]
    path = tmp_path / "part1.h5ad"
    parts[1].write_h5ad(path)
    vocab = sgf.Vocabulary.build([parts[0], path, parts[2]], chunk_size=8, name="mine")
    expected = expected_medians(parts)
    assert vocab.genes == sorted(expected)
    assert vocab.has_cls and vocab.gene_token_ids[0] == 4
    for g, tok in vocab.token_dict.items():
        assert vocab.median_by_token[tok] == expected[g]  # exactly numpy.median


def test_build_sums_duplicates_and_filters_min_cells():
    genes = ["ENSG00000000001", "ENSG00000000001.2", "ENSG00000000003", "ENSG00000000004"]
    counts = np.array([[1, 2, 0, 5], [3, 0, 0, 5], [0, 4, 1, 5]], dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    vocab = sgf.Vocabulary.build(adata, min_cells=2)
    assert vocab.genes == ["ENSG00000000001", "ENSG00000000004"]
    merged = np.array([3.0, 3.0, 4.0]) / counts.sum(axis=1) * 10_000
    assert vocab.median_by_token[4] == np.median(merged)


def test_build_refuses_non_counts_and_empty_corpus():
    adata = corpus(0, 5, ["ENSG00000000001", "ENSG00000000002"])
    adata.X = adata.X * 0.5
    with pytest.raises(ValueError, match="raw counts"):
        sgf.Vocabulary.build(adata)
    with pytest.raises(ValueError, match="corpus is empty"):
        sgf.Vocabulary.build([])


def test_stretch_medians_equal_numpy_median_bit_for_bit():
    from scgeneformer.pp._median_kernel import stretch_medians

    rng = np.random.default_rng(3)
    lengths = np.arange(1, 61)
    # Ratios of small integers, as CP10k values are: many ties, odd and even lengths.
    spill = rng.integers(1, 9, lengths.sum()) / rng.integers(1, 7, lengths.sum()) * 10_000 / 3
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    genes = rng.permutation(len(lengths))
    got = stretch_medians(spill, starts, lengths, genes)
    for g, median in zip(genes, got, strict=True):
        assert median == np.median(spill[starts[g] : starts[g] + lengths[g]])
