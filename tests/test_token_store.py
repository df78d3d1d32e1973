"""The on-disk token store and the arrow reader: same tokens as rank_tokenize, bounded memory."""

from __future__ import annotations

import json
import sys
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import pytest
import scipy.sparse as sp

import scgeneformer as sgf
from scgeneformer.data._sources import read_arrow_dataset
from scgeneformer.data._store import TokenStore
from scgeneformer.data._store_build import build_token_store, store_matches

V1_SPECIAL = {"<pad>": 0, "<mask>": 1}

# File b sums a duplicated gene on purpose; the warning is checked once, below.
pytestmark = pytest.mark.filterwarnings("ignore:.*counts are summed")


def synthetic_file(path, n_cells, seed, *, shuffle_genes=False, n_genes=150):
    adata = sgf.datasets.synthetic_states(n_cells=n_cells, n_genes=n_genes, random_state=seed)
    adata.obs["note"] = [f"cell-{seed}-{i}" for i in range(adata.n_obs)]
    adata.obs["odd"] = np.arange(adata.n_obs) % 2 == 1
    if shuffle_genes:
        # Another column order, genes the vocabulary does not know, and a second column of
        # gene 1 (in lower case: summed with it, with a warning).
        order = np.random.default_rng(seed).permutation(adata.n_vars)
        extra = ad.AnnData(
            sp.csr_matrix(np.random.default_rng(seed).integers(0, 5, (adata.n_obs, 5))),
            obs=pd.DataFrame(index=adata.obs_names),
            var=pd.DataFrame(
                index=[f"UNKNOWN{i}" for i in range(4)] + [adata.var_names[0].lower()]
            ),
        )
        adata = ad.concat([adata[:, order], extra], axis=1, merge="first")
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    paths = [
        synthetic_file(folder / "a.h5ad", 230, 1),
        synthetic_file(folder / "b.h5ad", 120, 2, shuffle_genes=True),
        synthetic_file(folder / "c.h5ad", 175, 3),
    ]
    return paths


def reference_tokens(path, vocab, max_length):
    adata = ad.read_h5ad(path)
    sgf.pp.rank_tokenize(adata, vocab, max_length=max_length)
    n = adata.obs["geneformer_n_tokens"].to_numpy()
    return adata, [
        adata.obsm["geneformer_tokens"][i, : n[i]].astype(np.int64) for i in range(len(n))
    ]


@pytest.mark.parametrize("cls", [True, False])
def test_store_tokens_equal_rank_tokenize_and_obs_is_kept(corpus, tmp_path, cls):
    vocab = sgf.Vocabulary.build(
        [ad.read_h5ad(corpus[0])], special_tokens=None if cls else V1_SPECIAL, max_length=64
    )
    backed = ad.read_h5ad(corpus[2], backed="r")
    try:
        store = build_token_store(
            [corpus[0], corpus[1], backed],
            vocab,
            tmp_path / "store",
            obs_keys=["state", "n_counts", "note", "odd"],
            chunk_size=50,  # smaller than every file: several chunks each
            max_length=40,
        )
    finally:
        backed.file.close()
    assert store.manifest["token_dtype"] == "uint16"
    assert [s["n_cells"] for s in store.manifest["shards"]] == [230, 120, 175]
    expected, frames = [], []
    for path in corpus:
        adata, rows = reference_tokens(path, vocab, 40)
        expected.extend(rows)
        frames.append(adata.obs)
    assert len(store) == len(expected)
    assert store.lengths.tolist() == [len(r) for r in expected]
    padded = store.padded(np.arange(len(store)))
    for i, row in enumerate(expected):
        np.testing.assert_array_equal(padded[i, : len(row)], row)
        assert (padded[i, len(row) :] == 0).all()
    np.testing.assert_array_equal(store.cell(300), expected[300])
    # Any subset, any order.
    pick = np.array([400, 3, 231, 3])
    np.testing.assert_array_equal(store.padded(pick)[2, : len(expected[231])], expected[231])

    obs = store.obs()
    reference = pd.concat(frames)
    assert obs.index.tolist() == reference.index.astype(str).tolist()
    assert isinstance(obs["state"].dtype, pd.CategoricalDtype)
    assert obs["state"].astype(str).tolist() == reference["state"].astype(str).tolist()
    np.testing.assert_array_equal(obs["n_counts"].to_numpy(), reference["n_counts"].to_numpy())
    assert obs["note"].tolist() == reference["note"].tolist()
    assert obs["odd"].dtype == bool and obs["odd"].tolist() == reference["odd"].tolist()

    reopened = TokenStore(tmp_path / "store")
    assert reopened.vocabulary == vocab and reopened.vocabulary_sha256 == vocab.sha256
    assert "3 shards" in repr(reopened)


def test_store_memory_stays_bounded_by_the_chunk(tmp_path):
    path = synthetic_file(tmp_path / "big.h5ad", 4000, 5, n_genes=1000)
    vocab = sgf.Vocabulary.build(path, max_length=512)
    build_token_store([path], vocab, tmp_path / "warm", chunk_size=2000)  # warm the caches
    backed = ad.read_h5ad(path, backed="r")
    x = backed.X
    dense_bytes = backed.n_obs * backed.n_vars * 4
    stored_bytes = x.group["data"].size * 4 + x.group["indices"].size * 4
    backed.file.close()
    tracemalloc.start()
    try:
        build_token_store([path], vocab, tmp_path / "store", chunk_size=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Reading the matrix whole would take at least its stored size; chunks take a fraction.
    assert peak < 0.25 * min(stored_bytes, dense_bytes), (peak, stored_bytes, dense_bytes)
    assert len(TokenStore(tmp_path / "store")) == 4000


def test_worker_processes_give_the_same_store(corpus, tmp_path):
    vocab = sgf.Vocabulary.build(corpus[0], max_length=64)
    one = build_token_store(corpus, vocab, tmp_path / "one", n_jobs=1, chunk_size=64)
    with pytest.warns(UserWarning, match=r"b\.h5ad.*summed"):  # relayed from its worker
        two = build_token_store(corpus, vocab, tmp_path / "two", n_jobs=2, chunk_size=64)
    everything = np.arange(len(one))
    np.testing.assert_array_equal(one.padded(everything), two.padded(everything))


def test_store_matches_and_refusals(corpus, tmp_path):
    vocab = sgf.Vocabulary.build(corpus[0], max_length=64)
    folder = tmp_path / "store"
    build_token_store(corpus[:2], vocab, folder, max_length=64)
    assert store_matches(folder, corpus[:2], vocab, max_length=64)
    assert not store_matches(folder, corpus[:2], vocab, max_length=32)
    assert not store_matches(folder, corpus, vocab, max_length=64)
    other = sgf.Vocabulary.build(corpus[2], max_length=64, name="other")
    assert not store_matches(folder, corpus[:2], other, max_length=64)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_token_store(corpus[:1], vocab, folder)
    with pytest.raises(ValueError, match="empty"):
        build_token_store([], vocab, tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad"):
        build_token_store([tmp_path / "missing.h5ad"], vocab, tmp_path / "none")
    with pytest.raises(KeyError, match="not_a_column"):
        build_token_store(corpus[:1], vocab, tmp_path / "none", obs_keys=["not_a_column"])
    assert not (tmp_path / "none").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".none")]

    # A truncated shard is refused when opened.
    tokens = folder / "shard-00001" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        TokenStore(folder)
    with pytest.raises(FileNotFoundError, match="not a token store"):
        TokenStore(tmp_path)


def test_non_count_data_is_refused_naming_the_file(tmp_path):
    adata = sgf.datasets.synthetic_states(n_cells=50, n_genes=120, random_state=0)
    vocab = sgf.Vocabulary.build(adata)
    adata.X = adata.X.astype(np.float32) * 0.5
    adata.write_h5ad(tmp_path / "halves.h5ad")
    with pytest.raises(ValueError, match=r"halves\.h5ad.*non-integer"):
        build_token_store([tmp_path / "halves.h5ad"], vocab, tmp_path / "store")
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------- arrow data sets


def write_arrow_dataset(folder, cells, *, file_format=False, n_files=1):
    """A folder laid out as datasets.Dataset.save_to_disk writes it."""

    folder.mkdir()
    names = [f"data-{i:05d}-of-{n_files:05d}.arrow" for i in range(n_files)]
    for name, part in zip(names, np.array_split(np.arange(len(cells)), n_files), strict=True):
        rows = [list(map(int, cells[i])) for i in part]
        table = pa.table(
            {
                "input_ids": pa.array(rows, type=pa.list_(pa.int64())),
                "length": pa.array([len(r) for r in rows], type=pa.int64()),
            }
        )
        with pa.OSFile(str(folder / name), "wb") as sink:
            opener = pa.ipc.new_file if file_format else pa.ipc.new_stream
            with opener(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=7):  # several record batches
                    writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(
        json.dumps(
            {
                "features": {
                    "input_ids": {
                        "feature": {"dtype": "int64", "_type": "Value"},
                        "_type": "Sequence",
                    },
                    "length": {"dtype": "int64", "_type": "Value"},
                }
            }
        )
    )
    (folder / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": n} for n in names],
                "_fingerprint": "0123456789abcdef",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": None,
            }
        )
    )
    return folder


def random_cells(n, seed=0, low=4, high=60):
    rng = np.random.default_rng(seed)
    return [
        np.concatenate(
            [[2], rng.choice(np.arange(4, high), rng.integers(2, 30), replace=False), [3]]
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("file_format", [False, True])
def test_arrow_dataset_reads_input_ids(tmp_path, file_format):
    cells = random_cells(40)
    folder = write_arrow_dataset(tmp_path / "ds", cells, file_format=file_format, n_files=2)
    source = read_arrow_dataset(folder)
    assert len(source) == 40
    assert source.lengths.tolist() == [len(c) for c in cells]
    padded = source.padded(np.arange(40))
    for i, cell in enumerate(cells):
        np.testing.assert_array_equal(padded[i, : len(cell)], cell)
    assert source.max_token() == max(int(c.max()) for c in cells)


def test_arrow_dataset_problems(tmp_path, monkeypatch):
    folder = write_arrow_dataset(tmp_path / "ds", random_cells(5))
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path / "dd" / "train").mkdir()
    with pytest.raises(ValueError, match="DatasetDict"):
        read_arrow_dataset(tmp_path / "dd")

    other = tmp_path / "other"
    other.mkdir()
    table = pa.table({"tokens": pa.array([[1, 2]])})
    with pa.OSFile(str(other / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with pytest.raises(ValueError, match="no input_ids column"):
        read_arrow_dataset(other)

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"scgeneformer\[arrow\]"):
        read_arrow_dataset(folder)
