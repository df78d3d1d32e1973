"""Tokens written as Geneformer's arrow data set read back equal, through our reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

import scgeneformer as sgf
from scgeneformer.data import read_arrow_dataset, write_arrow_dataset

pa = pytest.importorskip("pyarrow")


def test_round_trip_through_our_reader_equals_the_tokens(tmp_path):
    adata = sgf.datasets.synthetic_states(n_cells=50, n_genes=120, random_state=0)
    adata.X[3] = 0  # a cell with no counts: no tokens, left out
    vocab = sgf.Vocabulary.build(adata, max_length=64)
    sgf.pp.rank_tokenize(adata, vocab)
    with pytest.warns(UserWarning, match="1 cells have no tokens"):
        folder = write_arrow_dataset(adata, tmp_path / "cells.dataset", obs_keys=["state", "donor"])
    kept = np.flatnonzero(adata.obs["geneformer_n_tokens"].to_numpy() > 0)
    assert len(kept) == 49

    source = read_arrow_dataset(folder)
    assert len(source) == 49
    tokens = adata.obsm["geneformer_tokens"][kept].astype(np.int64)
    np.testing.assert_array_equal(source.padded(np.arange(49)), tokens)

    # The columns the official tools read, and the obs columns asked for.
    table = pa.ipc.open_stream(str(folder / "data-00000-of-00001.arrow")).read_all()
    assert table.column_names == ["input_ids", "length", "state", "donor"]
    lengths = adata.obs["geneformer_n_tokens"].to_numpy()[kept]
    assert table.column("length").to_pylist() == lengths.tolist()
    assert table.column("state").to_pylist() == adata.obs["state"].astype(str)[kept].tolist()
    first = table.column("input_ids")[0].as_py()
    assert first == tokens[0, : lengths[0]].tolist() and first[0] == vocab.cls_id
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["features"]["input_ids"] == {
        "feature": {"dtype": "int64", "_type": "Value"},
        "_type": "Sequence",
    }
    assert info["features"]["state"] == {"dtype": "string", "_type": "Value"}
    state = json.loads((folder / "state.json").read_text())
    assert state["_data_files"] == [{"filename": "data-00000-of-00001.arrow"}]

    with pytest.raises(FileExistsError, match="exists"):
        write_arrow_dataset(adata, folder)
    with pytest.raises(KeyError, match=r"not in adata\.obs"):
        write_arrow_dataset(adata, tmp_path / "other", obs_keys=["nope"])
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.dataset"]  # no scratch left
