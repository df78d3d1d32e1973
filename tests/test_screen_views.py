"""What a user sees of a screen: the ranking's order, the model it takes, the warnings."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest

import scgeneformer as sgf
from scgeneformer._screen_table import screen_table

from .test_in_silico import TINY

matplotlib.use("Agg")
SCREEN = dict(state_key="state", start_state="disease", goal_state="healthy", max_cells=6)


@pytest.fixture(scope="module")
def model_and_classifier():
    adata = sgf.datasets.synthetic_states(n_cells=120, n_genes=150, random_state=3)
    vocab = sgf.Vocabulary.build(adata, max_length=256)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    sgf.pp.rank_tokenize(adata, vocab)
    clf = sgf.tl.finetune(
        adata, model, label_key="state", epochs=1, lr=1e-3, baseline=False, random_state=0
    )
    return adata, model, clf


def test_a_classifier_is_screened_through_its_encoder_without_a_warning(model_and_classifier):
    adata, _, clf = model_and_classifier
    by_classifier, by_encoder = adata.copy(), adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sgf.tl.in_silico_delete(by_classifier, clf, **SCREEN)
        sgf.tl.embed(by_classifier, clf)
    sgf.tl.in_silico_delete(by_encoder, clf.encoder, **SCREEN)
    sgf.tl.embed(by_encoder, clf.encoder)
    for column in ("shift", "zscore", "n_cells"):
        np.testing.assert_array_equal(
            by_classifier.var[f"in_silico_delete_{column}"],
            by_encoder.var[f"in_silico_delete_{column}"],
        )
    np.testing.assert_array_equal(
        by_classifier.obsm["X_geneformer"], by_encoder.obsm["X_geneformer"]
    )
    with pytest.raises(TypeError, match=r"Geneformer or a sgf\.GeneformerClassifier"):
        sgf.tl.in_silico_delete(adata.copy(), "model", **SCREEN)


def test_screens_warn_when_the_model_never_learnt_the_states(model_and_classifier):
    adata, model, clf = model_and_classifier
    with pytest.warns(
        UserWarning, match=r"pretrained encoder, never fine-tuned.*label_key='state'"
    ):
        sgf.tl.in_silico_overexpress(adata.copy(), model, **SCREEN)
    other = adata.copy()
    other.obs["condition"] = other.obs["state"].map({"disease": "stim", "healthy": "ctrl"})
    with pytest.warns(UserWarning, match=r"fine-tuned on 'state'.*not on obs\['condition'\]"):
        sgf.tl.in_silico_delete(
            other, clf, state_key="condition", start_state="stim", goal_state="ctrl", max_cells=3
        )
    with warnings.catch_warnings():  # no states, nothing to have learnt
        warnings.simplefilter("error", UserWarning)
        sgf.tl.in_silico_delete(adata.copy(), model, genes=list(adata.var_names[:3]), max_cells=3)


def test_rankings_lead_with_the_zscore_and_leave_thin_genes_out(model_and_classifier):
    adata, _, clf = model_and_classifier
    adata = adata.copy()
    sgf.tl.in_silico_delete(adata, clf, min_cells=4, **SCREEN)
    var = adata.var.set_index("gene_symbol")
    n = var["in_silico_delete_n_cells"]
    assert ((n > 0) & (n < 4)).any()  # some genes were seen in too few cells

    ax = sgf.pl.deletion_ranking(adata, n_top=10, show=False)  # min_cells: the screen's 4
    shown = [t.get_text() for t in ax.get_yticklabels()][::-1]
    assert shown == var["in_silico_delete_zscore"][n >= 4].nlargest(10).index.tolist()
    assert ax.get_title(loc="left") == "Genes whose deletion moves disease cells toward healthy"
    assert "z-score" in ax.get_xlabel()
    cell_labels = [t.get_text() for t in ax.figure.axes[1].get_yticklabels()][::-1]
    assert cell_labels == [f"{n[g]} cells" for g in shown]

    ax = sgf.pl.deletion_ranking(adata, n_top=10, sort_by="shift", min_cells=1, show=False)
    shown = [t.get_text() for t in ax.get_yticklabels()][::-1]
    assert shown == var["in_silico_delete_shift"][n >= 1].nlargest(10).index.tolist()
    with pytest.raises(ValueError, match="sort_by must be one of"):
        sgf.pl.deletion_ranking(adata, sort_by="pval", show=False)

    ax = sgf.pl.deletion_volcano(adata, n_labels=3, fdr_threshold=1.01, show=False)
    labels = [t.get_text() for t in ax.texts]
    assert labels == var["in_silico_delete_zscore"][n >= 4].nlargest(3).index.tolist()

    table = screen_table(adata, gene_symbols="gene_symbol")
    assert table["tested"].tolist() == sorted(table["tested"], reverse=True)
    assert table.loc[table["tested"], "zscore"].is_monotonic_decreasing
    assert (table.loc[~table["tested"], "n_cells"] < 4).all()
    assert isinstance(table, pd.DataFrame) and table.index.isin(adata.var_names).all()
    matplotlib.pyplot.close("all")


def test_a_long_cpu_screen_warns_with_its_estimate(model_and_classifier, monkeypatch):
    from scgeneformer.tl import _cost

    adata, _, clf = model_and_classifier
    adata = adata.copy()
    lengths = adata.obs["geneformer_n_tokens"].to_numpy()
    expected = _cost.variant_flops(clf.encoder, lengths[:1], clf.encoder.num_layers - 1)
    assert expected[0] > 0
    monkeypatch.setattr(_cost, "MEASURED_CPU_FLOPS", 1e3)  # a very slow CPU
    with pytest.warns(UserWarning, match=r"about [\d,]+ minutes at the rate measured"):
        sgf.tl.in_silico_delete(adata, clf, device="cpu", **dict(SCREEN, max_cells=2))
    assert adata.uns["in_silico_delete"]["estimated_cpu_seconds"] > 300
    monkeypatch.setattr(_cost, "MEASURED_CPU_FLOPS", 1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sgf.tl.in_silico_delete(adata, clf, device="cpu", **dict(SCREEN, max_cells=2))


def test_the_first_tokenization_says_that_numba_compiles(monkeypatch, capsys):
    from scgeneformer.pp import _rank_kernel

    monkeypatch.setattr(_rank_kernel, "_kernels_compiled", lambda: False)
    monkeypatch.setattr(_rank_kernel.announce_first_use, "done", False, raising=False)
    monkeypatch.setattr(sgf.settings, "progress", True)
    _rank_kernel.announce_first_use()
    _rank_kernel.announce_first_use()
    assert capsys.readouterr().err.count("numba kernels") == 1
