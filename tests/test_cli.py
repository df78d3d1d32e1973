"""The command line: `scgeneformer demo`, `tokenize`, `embed` and `delete`."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scgeneformer as sgf
from scgeneformer.cli import main

from .test_in_silico import TINY


def test_demo_runs_the_whole_workflow_at_small_size(tmp_path):
    from scgeneformer._demo import DemoConfig, run_demo

    config = DemoConfig(
        output=tmp_path,
        n_cells=240,
        max_length=96,
        layers=1,
        hidden=32,
        pretrain_steps=6,
        finetune_epochs=1,
        deletion_cells=4,
    )
    result = run_demo(config)
    report = (tmp_path / "report.md").read_text()
    for figure in ("loss_curve.png", "umap.png", "confusion_matrix.png", "deletion_ranking.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in report
    rankings = result["comparison"]["rankings"]
    assert set(rankings) == {
        "deletion shift",
        "deletion z-score (rank-adjusted)",
        "differential expression (Wilcoxon)",
    }
    # The planted genes are differentially expressed by construction: DE must find them.
    assert rankings["differential expression (Wilcoxon)"]["auroc"] > 0.95
    assert "precision@" in report and "PCA + logistic regression" in report
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["timings"]["total"] > 0


def test_demo_command_line_checks_its_options(tmp_path):
    with pytest.raises(SystemExit, match="go with --data"):
        main(["demo", "--output", str(tmp_path), "--start", "stim"])


def test_tokenize_command_matches_the_python_call(tmp_path):
    adata = sgf.datasets.synthetic_states(n_cells=60, n_genes=200, random_state=1)
    vocab = sgf.Vocabulary.build(adata)
    vocab.save(tmp_path / "vocab.json")
    adata.write_h5ad(tmp_path / "in.h5ad")
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "in.h5ad"),
                str(tmp_path / "out.h5ad"),
                "--vocab",
                str(tmp_path / "vocab.json"),
            ]
        )
        == 0
    )
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    sgf.pp.rank_tokenize(adata, vocab)
    np.testing.assert_array_equal(
        written.obsm["geneformer_tokens"], adata.obsm["geneformer_tokens"]
    )
    assert written.uns["geneformer"]["vocabulary_sha256"] == vocab.sha256


@pytest.fixture()
def saved_model_and_cells(tmp_path):
    """Raw-count cells in an h5ad (not tokenized) and a tiny saved model over their genes."""
    adata = sgf.datasets.synthetic_states(n_cells=60, n_genes=120, random_state=2)
    vocab = sgf.Vocabulary.build(adata, max_length=256)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    model.save(tmp_path / "model")
    adata.write_h5ad(tmp_path / "in.h5ad")
    return adata, model, tmp_path


def test_embed_command_matches_the_python_call(saved_model_and_cells):
    adata, model, tmp_path = saved_model_and_cells
    args = ["embed", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad")]
    assert main([*args, "--model", str(tmp_path / "model"), "--genes"]) == 0
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    sgf.tl.embed(adata, model, genes=True)
    np.testing.assert_allclose(written.obsm["X_geneformer"], adata.obsm["X_geneformer"], 1e-5)
    np.testing.assert_allclose(
        written.varm["X_geneformer"], adata.varm["X_geneformer"], 1e-5, equal_nan=True
    )
    assert written.uns["geneformer"]["vocabulary_sha256"] == model.vocab.sha256


def test_delete_command_matches_the_python_call(saved_model_and_cells, capsys):
    adata, model, tmp_path = saved_model_and_cells
    screen = {"state_key": "state", "start_state": "disease", "goal_state": "healthy"}
    args = ["delete", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad")]
    options = ["--model", str(tmp_path / "model"), "--state-key", "state", "--start", "disease"]
    more = ["--goal", "healthy", "--max-cells", "6", "--table", str(tmp_path / "ranked.csv")]
    assert main([*args, *options, *more]) == 0
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    sgf.tl.in_silico_delete(adata, model, max_cells=6, **screen)
    for column in ("shift", "zscore", "fdr", "n_cells"):
        np.testing.assert_allclose(
            written.var[f"in_silico_delete_{column}"].to_numpy(dtype=float),
            adata.var[f"in_silico_delete_{column}"].to_numpy(dtype=float),
            rtol=1e-5,
            atol=1e-8,
            equal_nan=True,
        )
    table = pd.read_csv(tmp_path / "ranked.csv", index_col=0)
    expected = adata.var["in_silico_delete_zscore"].dropna().sort_values(ascending=False)
    assert table.index.tolist() == expected.index.tolist()
    assert table.index[0] in capsys.readouterr().out


def test_delete_command_names_unknown_states(saved_model_and_cells):
    _, _, tmp_path = saved_model_and_cells
    args = ["delete", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad")]
    options = ["--model", str(tmp_path / "model"), "--state-key", "state"]
    with pytest.raises(ValueError, match="healthy"):
        main([*args, *options, "--start", "ill", "--goal", "healthy"])
    assert not (tmp_path / "out.h5ad").exists()
