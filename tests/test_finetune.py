"""tl.finetune / tl.predict for cells: learning on PBMC 3k, splits, result slots, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scgeneformer as sgf
from scgeneformer.model._classifier import GeneformerClassifier
from scgeneformer.pl._classification import confusion_matrix
from scgeneformer.tl import finetune, predict
from scgeneformer.tl._predict import cell_proba
from scgeneformer.tl._splits import split_cells
from scgeneformer.train._finetune_loop import FitOptions, fit_classifier
from scgeneformer.train._history import as_history

matplotlib.use("Agg")

TINY = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
FAST = dict(epochs=2, lr=1e-3, token_budget=1024)


def tiny_model(vocab: sgf.Vocabulary, seed: int = 0, **overrides) -> sgf.Geneformer:
    config = {**TINY, "max_position_embeddings": vocab.max_length, **overrides}
    return sgf.Geneformer.from_config("V1-10M", vocab, random_state=seed, **config)


@pytest.fixture(scope="module")
def states():
    adata = sgf.datasets.synthetic_states(n_cells=160, n_genes=200, n_donors=5, random_state=0)
    vocab = sgf.Vocabulary.build(adata, max_length=32)
    return adata, vocab


@pytest.fixture(scope="module")
def fitted(states):
    adata, vocab = states
    adata = adata.copy()
    model = tiny_model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clf = finetune(adata, model, label_key="state", group_key="donor", **FAST)
    return adata, model, before, clf


# ---------------------------------------------------------------------- PBMC 3k: it learns
# Measured on PBMC 3k (9 Seurat cell types, 20% test), tiny model from random init (2 layers,
# hidden 64), vocabulary built on the data (genes in >= 20 cells), 64 tokens per cell, 10
# epochs: held-out macro-F1 0.70 / 0.56 / 0.73 / 0.61 / 0.64 (seeds 0-4); with the labels
# shuffled 0.11 / 0.11 / 0.09 (seeds 0-2); an untrained head 0.02; PCA + logistic regression
# 0.94 on the same split.
PBMC_FLOOR = 0.40


@pytest.fixture(scope="module")
def pbmc(pbmc3k):
    adata = pbmc3k.copy()
    vocab = sgf.Vocabulary.build(adata, min_cells=20, max_length=64, name="pbmc3k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # most of the 32,738 genes are not in that vocabulary
        sgf.pp.rank_tokenize(adata, vocab)
    model = tiny_model(vocab, hidden_size=64, intermediate_size=128)
    return adata, model


def test_pbmc3k_cell_types_are_learned_beside_the_pca_baseline(pbmc):
    adata, model = pbmc
    adata = adata.copy()
    clf = finetune(adata, model, label_key="cell_type", epochs=10, lr=1e-3, token_budget=4096)
    result = adata.uns["cell_type_finetune"]
    print(
        f"PBMC 3k held-out macro-F1 {result['macro_f1']:.3f} (accuracy {result['accuracy']:.3f});"
        f" PCA + logistic regression {result['baseline']['macro_f1']:.3f} "
        f"({result['baseline']['accuracy']:.3f})"
    )
    assert result["macro_f1"] >= PBMC_FLOOR
    assert result["baseline"]["macro_f1"] >= 0.85
    assert result["baseline"]["n_comps"] == 50

    # The same split with an untrained head stays far below the floor.
    test = np.flatnonzero(adata.obs["cell_type_split"] == "test")
    untrained = GeneformerClassifier.from_encoder(model, clf.classes, random_state=0)
    proba = cell_proba(
        untrained,
        adata.obsm["geneformer_tokens"][test],
        adata.obs["geneformer_n_tokens"].to_numpy()[test],
        budget=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
        progress=False,
    )
    from sklearn.metrics import f1_score

    truth = adata.obs["cell_type"].cat.codes.to_numpy()[test]
    assert f1_score(truth, proba.argmax(1), average="macro") < PBMC_FLOOR / 2


# ---------------------------------------------------------------------- result slots
def test_predictions_and_metrics_land_in_the_documented_slots(fitted, tmp_path):
    adata, _, _, clf = fitted
    split = adata.obs["state_split"]
    assert list(split.cat.categories) == ["train", "val", "test"]
    test = (split == "test").to_numpy()
    assert test.any() and (split == "val").any() and (split == "train").any()
    pred = adata.obs["state_pred"]
    assert pred.notna().to_numpy().tolist() == test.tolist()
    assert list(pred.cat.categories) == clf.classes == ["healthy", "disease"]
    proba = adata.obsm["state_proba"]
    assert proba.shape == (adata.n_obs, 2) and proba.dtype == np.float32
    assert np.isnan(proba[~test]).all()
    np.testing.assert_allclose(proba[test].sum(axis=1), 1.0, atol=1e-5)
    assert (np.asarray(clf.classes)[proba[test].argmax(axis=1)] == pred[test]).all()

    result = adata.uns["state_finetune"]
    counts = np.asarray(result["confusion_matrix"]["counts"])
    assert counts.sum() == test.sum() and list(result["confusion_matrix"]["labels"]) == clf.classes
    assert result["accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
    assert 0 <= result["baseline"]["macro_f1"] <= 1
    history = as_history(result["history"])
    assert [set(r) for r in history["train"]] == [{"epoch", "step", "loss"}] * 2
    assert [set(r) for r in history["eval"]] == [{"epoch", "step", "loss", "macro_f1"}] * 2
    assert [r["epoch"] for r in history["train"]] == [r["epoch"] for r in history["eval"]] == [1, 2]
    assert clf.history == history and clf.training_args["test_macro_f1"] == result["macro_f1"]

    adata.write_h5ad(tmp_path / "out.h5ad")  # every slot is storable
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["state_finetune"]["macro_f1"] == result["macro_f1"]


def test_no_donor_is_in_both_training_and_test(fitted):
    adata, *_ = fitted
    split = adata.obs["state_split"]
    donors = {s: set(adata.obs.loc[split == s, "donor"]) for s in ("train", "val", "test")}
    assert donors["test"] and not donors["test"] & (donors["train"] | donors["val"])
    groups = adata.uns["state_finetune"]["groups"]
    assert set(groups["test"]) == donors["test"]


def test_the_pretrained_model_is_left_untouched(fitted):
    _, model, before, clf = fitted
    assert model.has_mlm_head and not clf.encoder.has_mlm_head
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert clf.encoder is not model and clf.vocab is model.vocab


def test_freeze_layers_freezes_the_first_layers_only(states):
    adata, vocab = states
    adata = adata.copy()
    model = tiny_model(vocab)
    clf = finetune(
        adata, model, label_key="state", freeze_layers=1, val_size=0, baseline=False, **FAST
    )
    layers = zip(clf.encoder.bert.encoder.layer, model.bert.encoder.layer, strict=True)
    (ours0, theirs0), (ours1, theirs1) = layers
    for p, q in zip(ours0.parameters(), theirs0.parameters(), strict=True):
        assert not p.requires_grad and torch.equal(p, q)
    assert not torch.equal(ours1.output.dense.weight, theirs1.output.dense.weight)
    # As Geneformer: the embeddings below the frozen layers still train.
    assert not torch.equal(
        clf.encoder.bert.embeddings.LayerNorm.weight, model.bert.embeddings.LayerNorm.weight
    )
    assert clf.history["eval"] == [] and [r["epoch"] for r in clf.history["train"]] == [1, 2]


def test_early_stopping_keeps_the_best_validation_epoch(states):
    adata, vocab = states
    adata = adata.copy()
    sgf.pp.rank_tokenize(adata, vocab)
    tokens, n_tokens = adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"].to_numpy()
    clf = GeneformerClassifier.from_encoder(tiny_model(vocab), ["a", "b"], random_state=0)
    targets = torch.tensor(adata.obs["state"].cat.codes.to_numpy(), dtype=torch.long)
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    seen = []

    def evaluate():
        seen.append({k: v.clone() for k, v in clf.state_dict().items()})
        return 1.0, next(scores)

    options = FitOptions(
        freeze_layers=0,
        epochs=5,
        lr=1e-3,
        weight_decay=0.0,
        train_budget=1024,
        eval_budget=1024,
        class_weight=None,
        random_state=0,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    history = fit_classifier(
        clf,
        tokens,
        n_tokens,
        np.arange(adata.n_obs),
        lambda batch, logits, _ids: torch.nn.functional.cross_entropy(logits, targets[batch]),
        options,
        rng=np.random.default_rng(0),
        evaluate=evaluate,
        patience=2,
        desc="test",
    )
    assert [r["epoch"] for r in history["train"]] == [1, 2, 3, 4]
    assert [r["macro_f1"] for r in history["eval"]] == [0.5, 0.7, 0.6, 0.65]
    steps = [r["step"] for r in history["train"]]
    assert steps == sorted(steps) and steps[0] > 0
    for key, value in clf.state_dict().items():
        torch.testing.assert_close(value, seen[1][key], rtol=0, atol=0)  # epoch 2's weights


# ---------------------------------------------------------------------- predict and plot
def test_predict_writes_every_cell_and_warns_about_cells_without_tokens(fitted, states):
    _, _, _, clf = fitted
    query = states[0][:30].copy()
    x = query.X.toarray()
    x[3] = 0
    query.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning) as caught:
        predict(query, clf, key_added="state_query")
    assert any("1 cells have no tokens" in str(w.message) for w in caught)
    pred = query.obs["state_query_pred"]
    assert pred.isna().to_numpy().nonzero()[0].tolist() == [3]
    proba = query.obsm["state_query_proba"]
    assert np.isnan(proba[3]).all() and not np.isnan(np.delete(proba, 3, axis=0)).any()
    assert query.uns["state_query_predict"]["n_cells_without_tokens"] == 1

    # The classifier's label key is the default prefix.
    with pytest.warns(UserWarning, match="no tokens"):
        predict(query, clf)
    assert "state_pred" in query.obs and "state_proba" in query.obsm


def test_confusion_matrix_plot(fitted, tmp_path):
    adata, *_ = fitted
    ax = confusion_matrix(adata, "state", show=False)
    assert isinstance(ax, matplotlib.axes.Axes)
    rows = [float(t.get_text()) for t in ax.texts]
    assert len(rows) == 4
    np.testing.assert_allclose(np.reshape(rows, (2, 2)).sum(axis=1), 1.0, atol=0.011)
    ax = confusion_matrix(adata, "state", normalize=False, show=False)
    assert sum(int(t.get_text()) for t in ax.texts) == (adata.obs["state_split"] == "test").sum()
    assert confusion_matrix(adata, "state", save=tmp_path / "cm.png", show=True) is None
    assert (tmp_path / "cm.png").is_file()
    with pytest.raises(ValueError, match=r"no column\(s\) \['cell_type_pred'\]"):
        confusion_matrix(adata, "cell_type")


# ---------------------------------------------------------------------- bad input
def labelled(states, **columns) -> ad.AnnData:
    adata = states[0][:40].copy()
    for key, values in columns.items():
        adata.obs[key] = values
    return adata


@pytest.mark.parametrize(
    ("columns", "kwargs", "message"),
    [
        ({}, {"label_key": "celltype"}, r"label_key='celltype' is not a column .*'cell_type'"),
        ({"one": ["a"] * 40}, {"label_key": "one"}, r"one class only \('a'"),
        (
            {"rare": ["a"] * 20 + ["b"] * 19 + ["c"]},
            {"label_key": "rare"},
            r"class\(es\) \{'c': 1\} have fewer than 2 members",
        ),
        (
            {"gaps": ["a", "b", None, None] * 10},
            {"label_key": "gaps"},
            r"20 missing labels \(NaN\) of 40; drop those cells first, e.g. adata = "
            r"adata\[adata.obs\['gaps'\].notna\(\)\]",
        ),
        (
            {"site": ["s1"] * 40},
            {"label_key": "state", "group_key": "site"},
            r"group_key='site' has a single group \('s1'\)",
        ),
        ({}, {"label_key": "state", "group_key": "batch"}, r"group_key='batch' is not a column"),
        ({}, {"label_key": "state", "freeze_layers": 3}, r"freeze_layers must be in \[0, 2\]"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(states, columns, kwargs, message):
    adata = labelled(states, **columns)
    with pytest.raises(ValueError, match=message):
        finetune(adata, tiny_model(states[1]), **kwargs)
    assert "geneformer_tokens" not in adata.obsm  # refused before any work


# ---------------------------------------------------------------------- splits
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_groups=st.integers(2, 12),
    n_classes=st.integers(2, 4),
    n_cells=st.integers(20, 300),
    skew=st.floats(0.2, 3.0),
    test_size=st.floats(0.1, 0.5),
    val_size=st.sampled_from([0.0, 0.1, 0.25]),
)
def test_no_group_is_ever_in_both_train_and_test(
    seed, n_groups, n_classes, n_cells, skew, test_size, val_size
):
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(n_groups, skew))  # from a few big groups to many even ones
    groups = np.array([f"donor{g}" for g in rng.choice(n_groups, n_cells, p=sizes)])
    groups[:2] = ["donor_a", "donor_b"]  # at least two groups
    y = rng.integers(0, n_classes, n_cells)
    split = split_cells(y, groups, test_size=test_size, val_size=val_size, random_state=seed)
    assert set(split) <= {"train", "val", "test"}
    test, rest = set(groups[split == "test"]), set(groups[split != "test"])
    assert test and rest and not test & rest
    assert (split == "train").any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_cells=st.integers(10, 200), n_classes=st.integers(2, 6))
def test_stratified_split_puts_every_class_on_both_sides(seed, n_cells, n_classes):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(n_classes).repeat(2), rng.integers(0, n_classes, n_cells)])
    split = split_cells(y, test_size=0.2, val_size=0.1, random_state=seed)
    for label in range(n_classes):
        assert {"train", "test"} <= set(split[y == label])
    assert abs((split == "test").mean() - 0.2) < 0.15


def test_split_by_group_keeps_the_class_mix_and_size():
    y = np.tile([0, 0, 0, 1], 250)
    groups = np.repeat(np.arange(20), 50)
    split = split_cells(y, groups, test_size=0.2, val_size=0.1, random_state=3)
    test = split == "test"
    assert 0.15 <= test.mean() <= 0.25
    assert abs(y[test].mean() - 0.25) < 0.05
    assert pd.Series(groups[test]).nunique() == test.sum() // 50
