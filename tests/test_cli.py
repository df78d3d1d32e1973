"""The command line: `scgeneformer demo`, `tokenize`, `finetune`, `embed`, `delete`,
`overexpress`, and their help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scgeneformer as sgf
from scgeneformer.cli import main

from .test_in_silico import TINY

DEMO_SIZES = dict(
    max_length=96, layers=1, hidden=32, pretrain_steps=6, finetune_epochs=1, deletion_cells=4
)


def test_demo_saves_what_it_made_and_runs_again_on_user_data(tmp_path):
    from scgeneformer._demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(output=tmp_path, n_cells=240, **DEMO_SIZES))
    report = (tmp_path / "report.md").read_text()
    for figure in ("loss_curve.png", "umap.png", "confusion_matrix.png", "deletion_ranking.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in report
    rankings = result["comparison"]["rankings"]
    assert list(rankings) == [
        "deletion z-score (rank-adjusted)",
        "deletion mean shift",
        "differential expression (Wilcoxon)",
    ]
    # The planted genes are differentially expressed by construction: DE must find them.
    assert rankings["differential expression (Wilcoxon)"]["auroc"] > 0.95
    assert "precision@" in report and "PCA + logistic regression" in report
    for term in ("**shift**", "**z-score**", "**FDR**", "4 of the", "split by `donor`"):
        assert term in report, term
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["timings"]["total"] > 0

    # What it made: the ranked table (z-score order, the report's order), models, cells.
    table = pd.read_csv(tmp_path / "ranked_genes.csv", index_col=0)
    tested = table[table["tested"]]
    assert tested["zscore"].is_monotonic_decreasing
    assert (tested["n_cells"] >= 3).all() and (table[~table["tested"]]["n_cells"] < 3).all()
    assert table["tested"].tolist() == sorted(table["tested"], reverse=True)  # untested last
    assert f"| 1 | {tested['gene'].iloc[0]} | {tested['zscore'].iloc[0]:.2f} |" in report
    clf = sgf.GeneformerClassifier.from_pretrained(tmp_path / "classifier")
    assert clf.label_key == "state" and set(clf.classes) == {"disease", "healthy"}
    assert sgf.Geneformer.from_pretrained(tmp_path / "pretrained_model").has_mlm_head
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert {"X_geneformer", "X_umap", "state_proba"} <= set(cells.obsm)
    assert "in_silico_delete_zscore" in cells.var and "state_pred" in cells.obs

    # A second run in the same folder, on a user's file (no planted genes), subsampled.
    user = sgf.datasets.synthetic_states(n_cells=300, random_state=3)
    user.var = user.var[["gene_symbol"]]
    user.write_h5ad(tmp_path / "user.h5ad")
    config = DemoConfig(output=tmp_path, data=tmp_path / "user.h5ad", subsample=200, **DEMO_SIZES)
    result = run_demo(config)
    report = (tmp_path / "report.md").read_text()
    assert "200 cells drawn at random" in report and "200 cells, 600 genes" in report
    assert "planted" not in report and "rankings" not in result["comparison"]
    assert "Beside differential expression" in report
    assert ad.read_h5ad(tmp_path / "cells.h5ad").n_obs == 200
    assert not list(tmp_path.glob(".pretraining-*"))  # the scratch checkpoints are gone


def test_demo_command_line_checks_its_options(tmp_path):
    with pytest.raises(SystemExit, match="go with --data"):
        main(["demo", "--output", str(tmp_path), "--start", "stim"])
    with pytest.raises(SystemExit, match="go with --data"):
        main(["demo", "--output", str(tmp_path), "--subsample", "100"])


COMMANDS = ("demo", "tokenize", "pretrain", "finetune", "embed", "delete", "overexpress")


def test_help_of_every_command_is_quick_and_imports_no_torch():
    script = (
        "import sys, time\n"
        "started = time.perf_counter()\n"
        "from scgeneformer.cli import main\n"
        f"for command in {COMMANDS!r} + ('',):\n"
        "    try:\n"
        "        main([command, '--help'] if command else ['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, command\n"
        "heavy = sorted(m for m in ('torch', 'scanpy', 'anndata', 'numba') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'SECONDS', time.perf_counter() - started)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["HEAVY", "[]"], done.stdout[-500:]
    assert float(last[-1]) < 1.0
    for command in COMMANDS:
        assert f"usage: scgeneformer {command}" in done.stdout


def test_every_option_has_help_and_shows_its_default():
    from scgeneformer.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) <= set(commands.choices)
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = command.format_help()
        for action in command._actions:
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action)


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
    var = adata.var[adata.var["in_silico_delete_n_cells"] > 0]
    tested = var[var["in_silico_delete_n_cells"] >= 3]
    expected = tested["in_silico_delete_zscore"].sort_values(ascending=False, kind="stable")
    assert table.index[: len(expected)].tolist() == expected.index.tolist()
    assert len(table) == len(var) and not table["tested"].iloc[len(expected) :].any()
    assert table.index[0] in capsys.readouterr().out


def test_delete_command_names_unknown_states(saved_model_and_cells, capsys):
    _, _, tmp_path = saved_model_and_cells
    args = ["delete", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad")]
    options = ["--model", str(tmp_path / "model"), "--state-key", "state"]
    assert main([*args, *options, "--start", "ill", "--goal", "healthy"]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith("error: ['ill'] not found") and "healthy" in printed
    assert printed.count("\n") == 1 and "Traceback" not in printed
    assert not (tmp_path / "out.h5ad").exists()
    # --debug keeps the traceback for a report
    with pytest.raises(ValueError, match="the states present are"):
        main(["--debug", *args, *options, "--start", "ill", "--goal", "healthy"])


def test_finetune_then_overexpress_on_the_command_line(saved_model_and_cells, capsys):
    adata, _, tmp_path = saved_model_and_cells
    cells = str(tmp_path / "in.h5ad")
    fit = ["finetune", cells, str(tmp_path / "clf"), "--model", str(tmp_path / "model")]
    fit += ["--label-key", "state", "--epochs", "1", "--lr", "1e-3", "--seed", "0"]
    assert main([*fit, "--predictions", str(tmp_path / "pred.h5ad")]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    clf = sgf.GeneformerClassifier.from_pretrained(tmp_path / "clf")
    assert clf.label_key == "state"
    predicted = ad.read_h5ad(tmp_path / "pred.h5ad").obs
    test = (predicted["state_split"] == "test").to_numpy()
    assert test.any() and predicted["state_pred"][test].notna().all()

    # The classifier folder is what the screens take; the CLI equals the Python call.
    screen = ["overexpress", cells, str(tmp_path / "over.h5ad"), "--model", str(tmp_path / "clf")]
    screen += ["--state-key", "state", "--start", "disease", "--goal", "healthy"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fine-tuned classifier: no warning
        assert main([*screen, "--max-cells", "3", "--genes", *adata.var_names[:5]]) == 0
    written = ad.read_h5ad(tmp_path / "over.h5ad")
    sgf.tl.in_silico_overexpress(
        adata,
        clf,
        state_key="state",
        start_state="disease",
        goal_state="healthy",
        genes=list(adata.var_names[:5]),
        max_cells=3,
    )
    np.testing.assert_allclose(
        written.var["in_silico_overexpress_zscore"].to_numpy(dtype=float),
        adata.var["in_silico_overexpress_zscore"].to_numpy(dtype=float),
        rtol=1e-5,
        equal_nan=True,
    )
    assert written.uns["in_silico_overexpress"]["mode"] == "overexpress"


def test_tokenize_says_how_many_genes_matched_and_hints_in_flags(tmp_path, capsys):
    adata = sgf.datasets.synthetic_states(n_cells=40, n_genes=200, random_state=1)
    vocab = sgf.Vocabulary.build(adata[:, :150])
    vocab.save(tmp_path / "vocab.json")
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = ["tokenize", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad")]
    assert main([*args, "--vocab", str(tmp_path / "vocab.json")]) == 0
    assert "150 of 200 genes matched" in capsys.readouterr().out

    # Symbols against a V1-style vocabulary (no <cls>): the V1 symbol file, in flags.
    genes = list(adata.var_names)
    v1 = sgf.Vocabulary({g: i + 2 for i, g in enumerate(genes)}, dict.fromkeys(genes, 1.0))
    v1.save(tmp_path / "v1.json")
    adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
    adata.write_h5ad(tmp_path / "symbols.h5ad")
    args = ["tokenize", str(tmp_path / "symbols.h5ad"), str(tmp_path / "out.h5ad")]
    assert main([*args, "--vocab", str(tmp_path / "v1.json")]) == 2
    printed = capsys.readouterr().err
    assert "--mapping-dict gene_name_id_dict_gc30M.pkl" in printed
    assert "--gene-key" in printed and "gc104M" not in printed
