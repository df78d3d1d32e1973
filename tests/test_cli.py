"""The command line: `scgeneformer demo` and `scgeneformer tokenize`."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

import scgeneformer as sgf
from scgeneformer.cli import main


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
