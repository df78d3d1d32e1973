"""The command line: `scgeneformer demo` and `scgeneformer tokenize`."""

from __future__ import annotations

import anndata as ad
import numpy as np

import scgeneformer as sgf
from scgeneformer.cli import main


def test_demo_writes_a_report_with_drivers_higher_in_disease(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--n-cells", "300"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "median driver position" in report
    adata = ad.read_h5ad(tmp_path / "tokenized.h5ad")
    assert "geneformer_tokens" in adata.obsm
    out = capsys.readouterr().out
    healthy = float(out.split("drivers in healthy cells: median token position ")[1].split()[0])
    disease = float(out.split("drivers in disease cells: median token position ")[1].split()[0])
    # Drivers are up in disease, so they rank nearer the top of disease cells' token lists.
    assert disease < healthy


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
