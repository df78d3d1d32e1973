"""LoRA classifiers: few weights train, adapters save small, load on their base, merge."""

from __future__ import annotations

import json
import sys

import anndata as ad
import numpy as np
import pandas as pd
import peft
import pytest
import scipy.sparse as sp
import torch
import transformers

import scgeneformer as sgf
from scgeneformer.model._classifier import GeneformerClassifier
from scgeneformer.model._lora import (
    LoraOptions,
    adapter_parameters,
    add_lora,
    encoder_sha256,
    lora_layers,
    trainable_fraction,
)
from scgeneformer.tl import finetune, predict

from .conftest import small_vocab

TINY = dict(
    num_hidden_layers=3,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
CLASSES = ["a", "b"]
TARGET_PATHS = ("attention.self.query", "attention.self.value", "output.dense")
FIT = dict(epochs=3, lr=1e-2, token_budget=256, baseline=False, early_stopping_patience=None)


def two_states(vocab: sgf.Vocabulary, n_cells: int = 96, seed: int = 0) -> ad.AnnData:
    """Cells of two states, each marked by its own gene at the top of its ranking."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (n_cells, vocab.n_genes)).astype(np.float32)
    state = np.array(CLASSES)[np.arange(n_cells) % 2]
    counts[:, 0] = np.where(state == "a", 60, 0)
    counts[:, 1] = np.where(state == "b", 60, 0)
    return ad.AnnData(
        sp.csr_matrix(counts),
        obs=pd.DataFrame({"state": state}, index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=vocab.genes),
    )


def padded(adata: ad.AnnData) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(adata.obsm["geneformer_tokens"].astype(np.int64))
    return ids, ids != 0


def lora_classifier(model: sgf.Geneformer, task: str = "cell", **options) -> GeneformerClassifier:
    """An untrained LoRA classifier whose adapters are non-zero (as after training)."""
    clf = GeneformerClassifier.from_encoder(model, CLASSES, task=task, random_state=1)
    add_lora(clf, LoraOptions(r=4, **options))
    with torch.no_grad():
        for param in adapter_parameters(clf).values():
            param.add_(torch.randn_like(param) * 0.1)
    return clf.eval()


@pytest.fixture(scope="module")
def vocab() -> sgf.Vocabulary:
    return small_vocab(40, cls=False, max_length=32)


@pytest.fixture(scope="module")
def base(vocab, tmp_path_factory) -> sgf.Geneformer:
    """A pretrained stand-in, loaded from its folder as a user's would be."""
    folder = tmp_path_factory.mktemp("base") / "model"
    sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY).save(folder)
    return sgf.Geneformer.from_pretrained(folder)


@pytest.fixture(scope="module")
def fitted(vocab, base):
    adata = two_states(vocab)
    options = {"r": 2, "dropout": 0.1}  # rank 2 of 32 as rank 8 of 256 (V1-10M's width)
    clf = finetune(adata, base, label_key="state", adapter="lora", adapter_options=options, **FIT)
    return adata, clf


def test_lora_trains_few_weights_and_learns(vocab, base, fitted, tmp_path):
    adata, clf = fitted
    full = GeneformerClassifier.from_encoder(base, CLASSES)
    n_lora = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    assert n_lora / sum(p.numel() for p in full.parameters() if p.requires_grad) < 0.2
    assert trainable_fraction(clf) < 0.2 and trainable_fraction(full) == 1.0
    # Default targets: query, key and value of every layer; embeddings and base weights frozen.
    assert len(list(lora_layers(clf))) == 3 * base.num_layers
    assert not any(p.requires_grad for p in clf.encoder.bert.embeddings.parameters())
    assert encoder_sha256(clf.encoder.bert) == encoder_sha256(base.bert)
    assert all(p.requires_grad for p in clf.classifier.parameters())
    assert all(p.requires_grad for p in clf.pooler.parameters())
    # Training moved the adapters (lora_B starts at zero) and the loss fell.
    lora_b = [p for k, p in adapter_parameters(clf).items() if "lora_B" in k]
    assert all(bool(p.abs().sum() > 0) for p in lora_b)
    losses = [r["loss"] for r in clf.history["train"]]
    assert losses[-1] < 0.5 * losses[0]
    assert adata.uns["state_finetune"]["macro_f1"] == 1.0
    params = adata.uns["state_finetune"]["params"]
    assert params["adapter"] == {"type": "lora", **LoraOptions(r=2).as_dict()}
    assert "quantize" not in params
    adata.write_h5ad(tmp_path / "fitted.h5ad")  # the recorded options store in h5ad
    assert "adapter=lora(r=2, alpha=16, query+key+value)" in repr(clf)


def test_fresh_adapters_change_nothing(base, vocab):
    # B = 0 at the start: the unfused projections the adapters force give the fused logits.
    adata = two_states(vocab, n_cells=8)
    sgf.pp.rank_tokenize(adata, vocab)
    ids, mask = padded(adata)
    plain = GeneformerClassifier.from_encoder(base, CLASSES, random_state=3).eval()
    clf = GeneformerClassifier.from_encoder(base, CLASSES, random_state=3)
    add_lora(clf, LoraOptions(target_modules=("query", "value", "output")), freeze_layers=1)
    names = [name for name, _ in lora_layers(clf.encoder.bert.encoder)]
    assert names == [f"layer.{i}.{m}" for i in (1, 2) for m in TARGET_PATHS]
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(ids, mask), plain(ids, mask), rtol=0, atol=1e-6)


def test_predict_save_and_load_give_identical_predictions(fitted, tmp_path):
    adata, clf = fitted
    adata = adata.copy()
    clf.train()  # as finetune leaves it: predictions still run without the adapters' dropout
    predict(adata, clf, key_added="first")
    predict(adata, clf, key_added="again")
    np.testing.assert_array_equal(adata.obsm["first_proba"], adata.obsm["again_proba"])

    folder = clf.save(tmp_path / "adapter")
    assert not (folder / "model.safetensors").exists()
    meta = json.loads((folder / "scgeneformer.json").read_text())
    assert meta["format"] == "scgeneformer-lora-classifier"
    assert meta["adapter"]["r"] == 2
    assert meta["adapter"]["target_modules"] == ["query", "key", "value"]
    assert meta["base"]["folder"] == str(clf.encoder.source_folder)
    full = clf.save(tmp_path / "full", merged=True)
    adapter_size = (folder / "adapter_model.safetensors").stat().st_size
    assert adapter_size < 0.2 * (full / "model.safetensors").stat().st_size

    loaded = GeneformerClassifier.from_pretrained(folder)
    assert loaded.adapter.options == clf.adapter.options and not loaded.training
    assert loaded.classes == clf.classes and loaded.label_key == "state"
    assert loaded.history == clf.history
    predict(adata, loaded, key_added="loaded")
    np.testing.assert_array_equal(adata.obsm["first_proba"], adata.obsm["loaded_proba"])
    assert (adata.obs["first_pred"] == adata.obs["loaded_pred"]).all()


@pytest.mark.parametrize(
    ("task", "head"),
    [("cell", "BertForSequenceClassification"), ("gene", "BertForTokenClassification")],
)
def test_merged_classifier_loads_in_transformers(base, vocab, tmp_path, task, head):
    clf = lora_classifier(base, task=task, target_modules=("query", "value", "intermediate"))
    adata = two_states(vocab, n_cells=12, seed=3)
    sgf.pp.rank_tokenize(adata, vocab)
    ids, mask = padded(adata)
    folder = clf.save(tmp_path / "merged", merged=True)
    assert clf.adapter is not None  # merging leaves the LoRA classifier as it was
    hf, info = getattr(transformers, head).from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ours = clf(ids, mask)
        theirs = hf.eval()(ids, attention_mask=mask.long()).logits
        merged = GeneformerClassifier.from_pretrained(folder)
        assert merged.adapter is None and not list(lora_layers(merged))
        again = merged(ids, mask)
    if task == "gene":
        ours, theirs, again = ours[mask], theirs[mask], again[mask]
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(again.numpy(), ours.numpy(), rtol=0, atol=1e-5)

    if task == "cell":  # the tools embed with the adapted encoder
        sgf.tl.embed(adata, clf, key_added="X_lora")
        sgf.tl.embed(adata, merged, key_added="X_merged")
        np.testing.assert_allclose(adata.obsm["X_lora"], adata.obsm["X_merged"], atol=1e-5)
        with pytest.raises(ValueError, match=r"carries a LoRA classifier's adapters"):
            clf.encoder.save(tmp_path / "encoder")

    # The adapter folder round-trips, and peft loads it onto transformers' classifier.
    adapter = clf.save(tmp_path / "adapter")
    loaded = GeneformerClassifier.from_pretrained(adapter)
    hf_base = getattr(transformers, head).from_pretrained(
        base.source_folder, num_labels=2, attn_implementation="eager"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), clf(ids, mask), rtol=0, atol=0)
        with_peft = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
        theirs = with_peft(input_ids=ids, attention_mask=mask.long()).logits
        ours = clf(ids, mask)
    if task == "gene":
        ours, theirs = ours[mask], theirs[mask]
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=0, atol=1e-5)


def test_changed_moved_or_unknown_base_is_refused(vocab, tmp_path):
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=5, **TINY)
    clf = lora_classifier(model)
    with pytest.raises(ValueError, match=r"not loaded from a folder .*base='base'.*merged=True"):
        clf.save(tmp_path / "nowhere")
    other = sgf.Geneformer.from_config("V1-10M", vocab, random_state=6, **TINY)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match=r"not the base this LoRA adapter was trained on"):
        clf.save(tmp_path / "wrong", base=tmp_path / "other")
    assert not (tmp_path / "wrong").exists()

    model.save(tmp_path / "base")
    folder = clf.save(tmp_path / "adapter", base=tmp_path / "base")
    with pytest.raises(ValueError, match=r"holds a LoRA classifier .*GeneformerClassifier"):
        sgf.Geneformer.from_pretrained(folder)
    with pytest.raises(OSError):  # a folder without the encoder's weights: never half-loaded
        transformers.BertForSequenceClassification.from_pretrained(folder)

    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"base model .* is missing.*base="):
        GeneformerClassifier.from_pretrained(folder)
    loaded = GeneformerClassifier.from_pretrained(folder, base=tmp_path / "moved")
    assert loaded.adapter.base_folder == (tmp_path / "moved").resolve()

    other.save(tmp_path / "base")  # a changed base in the recorded place
    with pytest.raises(ValueError, match=r"changed or replaced.*cannot be applied"):
        GeneformerClassifier.from_pretrained(folder)


def test_bad_adapter_arguments_are_refused(vocab, base):
    adata = two_states(vocab, n_cells=24)
    common = dict(label_key="state", **FIT)
    bad = [
        (dict(adapter="qlora"), ValueError, r"adapter must be None or one of \['lora'\]"),
        (dict(adapter="lora", adapter_options={"rank": 4}), ValueError, r"unknown key.*'rank'"),
        (dict(adapter_options={"r": 4}), ValueError, r"adapter_options is given but adapter=None"),
        (dict(adapter="lora", adapter_options={"r": 0}), ValueError, r"\['r'\] must be"),
        (dict(adapter="lora", adapter_options={"dropout": 1.0}), ValueError, r"'dropout'"),
        (
            dict(adapter="lora", adapter_options={"target_modules": ["query", "dense"]}),
            ValueError,
            r"target_modules.*\['dense'\] unknown",
        ),
        (dict(adapter="lora", adapter_options=[4]), TypeError, r"mapping or a LoraOptions"),
        (dict(adapter="lora", quantize="2bit"), ValueError, r"quantize must be None or one of"),
        (dict(quantize="4bit"), ValueError, r"pass adapter='lora' too"),
        (dict(adapter="lora", quantize="4bit"), ValueError, r"needs a CUDA GPU.*device is cpu"),
        (dict(adapter="lora", quantize="8bit"), ValueError, r"'8bit' needs a CUDA GPU"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            finetune(adata, base, device="cpu", **common, **kwargs)
    with pytest.raises(ValueError, match=r"freeze_layers=3 leaves none of the 3 layers"):
        finetune(adata, base, adapter="lora", freeze_layers=3, **common)
    assert "geneformer_tokens" not in adata.obsm  # all refused before any work
    clf = lora_classifier(base)
    with pytest.raises(ValueError, match=r"trains only its adapters"):
        clf.freeze_layers(1)
    with pytest.raises(ValueError, match=r"has a LoRA adapter already"):
        add_lora(clf, LoraOptions())


def test_lora_without_peft_is_refused(vocab, base, tmp_path, monkeypatch):
    folder = lora_classifier(base).save(tmp_path / "adapter")
    adata = two_states(vocab, n_cells=24)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    message = r"adapter='lora' needs peft: pip install 'scgeneformer\[lora\]'"
    with pytest.raises(ImportError, match=message):
        finetune(adata, base, label_key="state", adapter="lora", **FIT)
    assert "geneformer_tokens" not in adata.obsm
    with pytest.raises(ImportError, match=message):
        GeneformerClassifier.from_pretrained(folder)
    # Without an adapter nothing needs peft.
    clf = finetune(adata, base, label_key="state", **{**FIT, "epochs": 1, "val_size": 0.0})
    assert clf.adapter is None


def test_finetuning_a_lora_classifier_starts_from_its_merged_weights(vocab, fitted):
    adata, clf = fitted
    again = finetune(adata.copy(), clf, label_key="state", **{**FIT, "epochs": 1})
    assert again.adapter is None and not list(lora_layers(again))
    assert all(p.requires_grad for p in again.parameters())


def test_gene_task_trains_lora_classifiers(vocab, base):
    adata = two_states(vocab, n_cells=48)
    labels = {gene: "xy"[i % 2] for i, gene in enumerate(vocab.genes[2:22])}
    clf = finetune(
        adata,
        base,
        label_key="kind",
        task="gene",
        gene_labels=labels,
        n_folds=2,
        adapter="lora",
        adapter_options=LoraOptions(r=2, target_modules="value"),
        **{**FIT, "epochs": 1},
    )
    assert clf.task == "gene" and clf.adapter.options.target_modules == ("value",)
    assert len(list(lora_layers(clf))) == base.num_layers
    assert adata.var["kind_pred"].notna().sum() == len(labels)
    assert adata.uns["kind_finetune"]["params"]["adapter"]["r"] == 2


def test_base_is_only_for_lora_folders(base, tmp_path):
    folder = lora_classifier(base).save(tmp_path / "full", merged=True)
    with pytest.raises(ValueError, match=r"base= is for LoRA classifier folders"):
        GeneformerClassifier.from_pretrained(folder, base=base.source_folder)
    plain = GeneformerClassifier.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"base= is for LoRA classifiers"):
        plain.save(tmp_path / "again", base=base.source_folder)
    with pytest.raises(ValueError, match=r"no adapter to merge"):
        plain.merge_adapter()


def test_command_line_trains_and_saves_a_lora_classifier(vocab, base, tmp_path, capsys):
    from scgeneformer.cli import main

    two_states(vocab, n_cells=48).write_h5ad(tmp_path / "cells.h5ad")
    args = ["finetune", str(tmp_path / "cells.h5ad"), str(tmp_path / "clf")]
    args += ["--model", str(base.source_folder), "--label-key", "state", "--epochs", "1"]
    args += ["--lr", "1e-2", "--no-baseline", "--adapter", "lora", "--lora-r", "2"]
    assert main([*args, "--lora-targets", "query", "value"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    clf = GeneformerClassifier.from_pretrained(tmp_path / "clf")
    assert clf.adapter.options == LoraOptions(r=2, target_modules=("query", "value"))
    assert clf.adapter.base_folder == base.source_folder


def test_a_multitask_lora_classifier_saves_loads_and_merges(vocab, base, tmp_path):
    adata = two_states(vocab)
    adata.obs["other"] = np.where(np.arange(adata.n_obs) % 4 < 2, "x", "y")
    clf = finetune(adata, base, label_key=["state", "other"], adapter="lora", **FIT)
    assert isinstance(clf, sgf.model.MultitaskClassifier) and clf.adapter is not None
    assert trainable_fraction(clf) < 0.5
    clf.save(tmp_path / "clf")
    loaded = GeneformerClassifier.from_pretrained(tmp_path / "clf")
    assert isinstance(loaded, sgf.model.MultitaskClassifier) and loaded.adapter is not None
    merged = loaded.merge_adapter()
    assert isinstance(merged, sgf.model.MultitaskClassifier) and merged.adapter is None
    runs = [adata.copy() for _ in range(3)]
    for target, model in zip(runs, (clf, loaded, merged), strict=True):
        predict(target, model)
    for column in ("state", "other"):
        first = runs[0].obsm[f"{column}_proba"]
        np.testing.assert_array_equal(runs[1].obsm[f"{column}_proba"], first)
        np.testing.assert_allclose(runs[2].obsm[f"{column}_proba"], first, atol=1e-5)
