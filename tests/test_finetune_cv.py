"""tl.finetune(n_splits=k): folds by group or class, per-split scores and their summary."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

import scgeneformer as sgf
from scgeneformer.tl._splits import cv_splits

from .test_finetune import FAST, tiny_model

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def cross_validated():
    adata = sgf.datasets.synthetic_states(n_cells=120, n_genes=200, n_donors=6, random_state=1)
    vocab = sgf.Vocabulary.build(adata, max_length=32)
    model = tiny_model(vocab)
    clf = sgf.tl.finetune(
        adata, model, label_key="state", group_key="donor", n_splits=3, **{**FAST, "epochs": 1}
    )
    return adata, clf


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_groups=st.integers(3, 12),
    n_cells=st.integers(30, 300),
    n_splits=st.integers(2, 3),
    val_size=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_cv_splits_never_share_a_group(seed, n_groups, n_cells, n_splits, val_size):
    rng = np.random.default_rng(seed)
    groups = np.array([f"donor{g}" for g in rng.choice(n_groups, n_cells)])
    groups[:n_groups] = [f"donor{g}" for g in range(n_groups)]  # every group present
    y = rng.integers(0, 2, n_cells)
    fold, val = cv_splits(y, groups, n_splits, val_size=val_size, random_state=seed)
    assert sorted(np.unique(fold)) == list(range(n_splits))
    for index in range(n_splits):
        test = fold == index
        assert not set(groups[test]) & set(groups[~test])
        assert not (val[index] & test).any()  # validation cells come from the training folds


def test_stratified_cv_spreads_every_class_over_the_folds():
    y = np.repeat([0, 1, 2], [10, 20, 30])
    fold, val = cv_splits(y, None, 5, val_size=0.2, random_state=0)
    for index in range(5):
        assert np.bincount(y[fold == index]).tolist() == [2, 4, 6]
        assert set(y[val[index]]) == {0, 1, 2}


def test_cv_scores_are_the_means_of_the_per_split_scores_computed_by_hand(cross_validated):
    adata, _ = cross_validated
    result = adata.uns["state_finetune"]
    truth = adata.obs["state"].cat.codes.to_numpy()
    pred = adata.obs["state_pred"].cat.codes.to_numpy()
    proba = adata.obsm["state_proba"]
    fold = adata.obs["state_fold"].to_numpy()
    by_hand = {"macro_f1": [], "accuracy": [], "auroc": []}
    for index in range(3):
        test = fold == index
        by_hand["macro_f1"].append(f1_score(truth[test], pred[test], average="macro"))
        by_hand["accuracy"].append(accuracy_score(truth[test], pred[test]))
        by_hand["auroc"].append(roc_auc_score(truth[test], proba[test, 1]))
    for name, values in by_hand.items():
        np.testing.assert_allclose(result["splits"][name], values)
        np.testing.assert_allclose(result[name], np.mean(values))
        np.testing.assert_allclose(result[f"{name}_sd"], np.std(values, ddof=1))
    per_class = [f1_score(truth[fold == i], pred[fold == i], average=None) for i in range(3)]
    np.testing.assert_allclose(result["f1_per_class"], np.mean(per_class, axis=0))
    # Every cell was tested once, by a classifier that never saw its donor.
    assert not np.isnan(proba).any() and sorted(np.unique(fold)) == [0, 1, 2]
    donors = adata.obs["donor"].astype(str).to_numpy()
    assert result["test_groups"] == [", ".join(sorted(set(donors[fold == i]))) for i in range(3)]
    baseline = result["baseline"]
    assert len(baseline["splits"]["macro_f1"]) == 3
    np.testing.assert_allclose(baseline["macro_f1"], np.mean(baseline["splits"]["macro_f1"]))
    assert baseline["macro_f1"] > 0.8  # the states are easy for PCA + logistic regression


def test_the_returned_classifier_is_trained_on_all_cells_and_predicts(cross_validated, tmp_path):
    adata, clf = cross_validated
    assert clf.training_args["n_splits"] == 3
    assert clf.training_args["cv_macro_f1"] == adata.uns["state_finetune"]["macro_f1"]
    query = adata.copy()
    sgf.tl.predict(query, clf, key_added="again")
    assert query.obs["again_pred"].notna().all()
    adata.write_h5ad(tmp_path / "cv.h5ad")  # every slot it writes is storable


def test_finetune_splits_plot(cross_validated, tmp_path):
    adata, _ = cross_validated
    ax = sgf.pl.finetune_splits(adata, "state", show=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["Geneformer", "PCA + logistic regression"]
    sgf.pl.finetune_splits(adata, "state", metric="accuracy", save=tmp_path / "cv.png")
    assert (tmp_path / "cv.png").stat().st_size > 0
    with pytest.raises(ValueError, match="metric must be one of"):
        sgf.pl.finetune_splits(adata, "state", metric="recall", show=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_key": "donor", "n_splits": 7}, r"n_splits=7 splits by group need at least 7 "),
        ({"n_splits": 0}, r"n_splits must be a whole number of at least 1, got 0"),
        ({"n_splits": 2, "task": "gene"}, r"n_splits is for cells"),
    ],
)
def test_bad_cross_validation_input_is_refused(kwargs, message):
    adata = sgf.datasets.synthetic_states(n_cells=40, n_genes=200, n_donors=6, random_state=0)
    vocab = sgf.Vocabulary.build(adata, max_length=32)
    with pytest.raises(ValueError, match=message):
        sgf.tl.finetune(adata, tiny_model(vocab), label_key="state", **kwargs)


def test_a_class_too_small_for_the_folds_is_named():
    adata = sgf.datasets.synthetic_states(n_cells=40, n_genes=200, random_state=0)
    adata.obs["state"] = ["rare"] * 3 + ["common"] * 37
    vocab = sgf.Vocabulary.build(adata, max_length=32)
    with pytest.raises(ValueError, match=r"\{'rare': 3\} have fewer than 5 members"):
        sgf.tl.finetune(adata, tiny_model(vocab), label_key="state", n_splits=5)
