"""tl.finetune(task="gene"): token classification, cross-validated over genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import scgeneformer as sgf
from scgeneformer.tl import finetune, predict
from scgeneformer.train._history import as_history

from .test_finetune import tiny_model

FAST = dict(epochs=6, lr=1e-3, token_budget=1024, n_folds=3)


@pytest.fixture(scope="module")
def modules():
    """Two gene modules: the targets of driver A and of driver B, with no state difference.

    The class of a gene shows only in co-expression: a target rises and falls with its
    driver's activity from cell to cell, so it ranks together with its module's genes.
    """
    adata = sgf.datasets.synthetic_states(
        n_cells=200,
        n_genes=300,
        n_cell_types=1,
        n_drivers=2,
        n_targets_per_driver=20,
        effect_size=0.0,
        random_state=0,
    )
    driver_of = adata.var["driver_of"]
    first = sorted(set(driver_of[driver_of != ""]))[0]
    labels = {g: "A" if d == first else "B" for g, d in driver_of[driver_of != ""].items()}
    vocab = sgf.Vocabulary.build(adata, max_length=64)
    return adata, vocab, labels


@pytest.fixture(scope="module")
def fitted(modules):
    adata, vocab, labels = modules
    adata = adata.copy()
    model = tiny_model(vocab, hidden_size=64, intermediate_size=128)
    clf = finetune(adata, model, label_key="module", task="gene", gene_labels=labels, **FAST)
    return adata, clf, labels


def test_co_expressed_gene_modules_are_told_apart_out_of_fold(fitted, tmp_path):
    adata, clf, labels = fitted
    result = adata.uns["module_finetune"]
    print(f"gene modules: cross-validated AUROC {result['auroc']:.3f}, folds {result['folds']}")
    assert result["auroc"] >= 0.9
    assert len(result["folds"]["auroc"]) == 3 and sum(result["folds"]["n_genes"]) == len(labels)

    var = adata.var
    labelled = var.index.isin(list(labels))
    assert var["module_pred"].notna().to_numpy().tolist() == labelled.tolist()
    assert np.isnan(var.loc[~labelled, "module_score"]).all()
    assert var.loc[labelled, "module_score"].between(0, 1).all()
    assert (var.loc[~labelled, "module_fold"] == -1).all()
    assert sorted(var.loc[labelled, "module_fold"].unique()) == [0, 1, 2]
    # Out-of-fold: each gene is predicted by the one model that never saw its label.
    genes = result["genes"]
    assert sorted(genes["gene"]) == sorted(labels)
    assert list(genes["pred"]) == var.loc[list(genes["gene"]), "module_pred"].astype(str).tolist()

    # The co-expression baseline on the same folds: the modules are co-expressed by
    # construction, so correlation with the labelled genes finds them.
    baseline = result["baseline"]
    print(f"gene modules: co-expression baseline AUROC {baseline['auroc']:.3f}")
    assert baseline["auroc"] >= 0.9 and baseline["n_genes"] == len(labels)
    assert len(baseline["folds"]["auroc"]) == 3

    assert clf.task == "gene" and clf.classes == ["A", "B"]
    history = as_history(result["history"])
    assert sorted({r["fold"] for r in history["train"]}) == [-1, 0, 1, 2]
    assert {frozenset(r) for r in history["train"]} == {
        frozenset({"fold", "epoch", "step", "loss", "peak_lr", "token_budget"})
    }
    assert history["eval"] == []
    assert [r["epoch"] for r in clf.history["train"]] == [1, 2, 3, 4, 5, 6]
    adata.write_h5ad(tmp_path / "genes.h5ad")
    assert ad.read_h5ad(tmp_path / "genes.h5ad").uns["module_finetune"]["auroc"] == result["auroc"]


def test_the_final_gene_classifier_predicts_genes_in_new_cells(fitted, modules):
    _, clf, labels = fitted
    query = modules[0][:50].copy()
    predict(query, clf, key_added="query")
    seen = query.var["query_n_cells"] > 0
    assert query.var.loc[seen, "query_pred"].notna().all()
    assert query.var.loc[~seen, "query_pred"].isna().all()
    labelled = list(labels)
    truth = np.array([labels[g] for g in labelled])
    assert (query.var.loc[labelled, "query_pred"].astype(str).to_numpy() == truth).mean() > 0.8


def test_labels_from_a_var_column_and_unknown_genes(modules):
    adata, vocab, labels = modules
    adata = adata.copy()
    adata.var["module"] = adata.var_names.map(labels)
    finetune(adata, tiny_model(vocab), label_key="module", task="gene", **{**FAST, "epochs": 1})
    assert adata.var["module_pred"].notna().sum() == len(labels)

    with pytest.warns(UserWarning, match=r"1 of 41 labelled genes are not in the vocabulary"):
        finetune(
            adata,
            tiny_model(vocab),
            label_key="extra",
            task="gene",
            gene_labels={**labels, "ENSG_NOT_A_GENE": "A"},
            **{**FAST, "epochs": 1},
        )


def bad_labels(labels, kind):
    items = list(labels.items())
    if kind == "nan":
        return {**labels, items[0][0]: None, items[1][0]: np.nan}
    if kind == "few":
        return {g: ("C" if i < 2 else c) for i, (g, c) in enumerate(items)}
    if kind == "clash":
        gene = items[0][0]
        return {gene: "A", gene.lower(): "B", **dict(items[1:])}
    if kind == "unknown":
        return {"ENSG_NOPE1": "A", "ENSG_NOPE2": "B"}
    return {g: "A" for g in labels}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", r"gene_labels has 2 missing labels \(NaN\) of 40; leave those genes out"),
        ("few", r"class\(es\) \{'C': 2\} have fewer than 3 members"),
        ("clash", r"name the same vocabulary gene with different labels"),
        ("unknown", r"None of the 2 genes in gene_labels is in adata.var_names"),
        ("one", r"gene_labels holds one class only \('A'\)"),
    ],
)
def test_bad_gene_labels_are_refused(modules, kind, message):
    adata, vocab, labels = modules
    with pytest.raises(ValueError, match=message):
        finetune(
            adata.copy(),
            tiny_model(vocab),
            label_key="module",
            task="gene",
            gene_labels=bad_labels(labels, kind),
            **FAST,
        )


def test_gene_task_without_labels_lists_the_var_columns(modules):
    adata, vocab, _ = modules
    with pytest.raises(ValueError, match=r"needs gene_labels=.*the columns \['gene_symbol'"):
        finetune(adata.copy(), tiny_model(vocab), label_key="module", task="gene")
    with pytest.raises(ValueError, match="n_folds must be at least 2"):
        finetune(adata.copy(), tiny_model(vocab), label_key="m", task="gene", n_folds=1)


def test_coexpression_baseline_finds_modules_and_not_shuffled_labels(modules):
    from scgeneformer.tl._baseline import coexpression_baseline
    from scgeneformer.tl._splits import gene_folds

    adata, _, labels = modules
    columns = np.array([adata.var_names.get_loc(g) for g in labels])
    codes = np.array([0 if labels[g] == "A" else 1 for g in labels])
    folds = gene_folds(codes, 4, 0)
    found = coexpression_baseline(adata.X, columns, codes, folds, 2)
    assert found["auroc"] >= 0.95 and found["accuracy"] >= 0.9
    shuffled = np.random.default_rng(0).permutation(codes)
    chance = coexpression_baseline(adata.X, columns, shuffled, gene_folds(shuffled, 4, 0), 2)
    assert chance["auroc"] < 0.75


def test_auto_learning_rate_of_the_gene_task_is_a_fixed_rate_without_a_range_test(
    modules, monkeypatch
):
    # A token classifier fits the labelled genes by their own embeddings at any rate, so a
    # range test would pick a high rate at which unseen genes are classed below chance.
    from scgeneformer.tl._finetune_genes import GENE_TASK_LR
    from scgeneformer.train import _finetune_loop

    adata, vocab, labels = modules
    adata = adata.copy()

    def refuse(*args, **kwargs):
        raise AssertionError("the gene task ran a learning-rate range test")

    monkeypatch.setattr(_finetune_loop, "lr_range_test", refuse)
    finetune(
        adata,
        tiny_model(vocab),
        label_key="module",
        task="gene",
        gene_labels=labels,
        epochs=1,
        token_budget=1024,
        n_folds=2,
    )
    result = adata.uns["module_finetune"]
    assert GENE_TASK_LR == 1e-3 and result["params"]["lr"] == GENE_TASK_LR
    history = as_history(result["history"])
    assert {record["peak_lr"] for record in history["train"]} == {GENE_TASK_LR}
