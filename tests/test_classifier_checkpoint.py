"""Classifier checkpoints in transformers' layout: official folders load, ours load there."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

import scgeneformer as sgf
from scgeneformer.model._classifier import GeneformerClassifier
from scgeneformer.tl import predict
from scgeneformer.train._finetune_loop import classifier_logits

from .conftest import small_vocab
from .test_model import TINY

transformers = pytest.importorskip("transformers")

CLASSES = ["B cell", "T cell", "NK"]


def hf_classifier(vocab: sgf.Vocabulary, head: str, seed: int = 0):
    """A random-weight transformers classifier (ReLU, eager), as official fine-tuned ones are."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_act="relu",
        layer_norm_eps=1e-12,
        attn_implementation="eager",
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
        **TINY,
    )
    model = getattr(transformers, head)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "weight" in name else 0.2))
    return model.eval()


def counts_adata(vocab: sgf.Vocabulary, n_cells: int = 30, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(1, vocab.n_genes)), (n_cells, vocab.n_genes))
    counts[:, 0] += 1
    return ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=vocab.genes),
    )


def padded_tokens(adata: ad.AnnData) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(adata.obsm["geneformer_tokens"].astype(np.int64))
    return ids, ids != 0


@pytest.fixture(scope="module", params=[True, False], ids=["V2-cls", "V1-no-cls"])
def vocab(request) -> sgf.Vocabulary:
    # Without <cls> (V1) the pooler reads each cell's top-ranked gene; both must match.
    return small_vocab(60, cls=request.param, max_length=48)


def test_official_sequence_classifier_predicts_as_transformers(tmp_path, vocab):
    hf = hf_classifier(vocab, "BertForSequenceClassification", seed=1)
    hf.save_pretrained(tmp_path / "official")  # official folders hold no vocabulary
    clf = GeneformerClassifier.from_pretrained(tmp_path / "official", vocab)
    assert clf.task == "cell" and clf.classes == CLASSES and not clf.training
    adata = counts_adata(vocab)
    predict(adata, clf, key_added="hf")
    ids, mask = padded_tokens(adata)
    with torch.no_grad():
        expected = torch.softmax(hf(ids, attention_mask=mask.long()).logits, -1).numpy()
    assert list(adata.uns["hf_predict"]["classes"]) == CLASSES
    np.testing.assert_allclose(adata.obsm["hf_proba"], expected, rtol=0, atol=1e-5)
    assert list(adata.obs["hf_pred"]) == [CLASSES[i] for i in expected.argmax(1)]


def test_saved_sequence_classifier_loads_in_transformers(tmp_path, vocab):
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=2, **TINY)
    clf = GeneformerClassifier.from_encoder(model, CLASSES, label_key="kind", random_state=3)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    clf.history = {"train": [{"epoch": 1, "step": 4, "loss": 0.5}], "eval": []}
    folder = clf.eval().save(tmp_path / "ours")

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "B cell", "1": "T cell", "2": "NK"}
    assert config["num_labels"] == 3 and config["problem_type"] == "single_label_classification"
    keys = set(load_file(folder / "model.safetensors"))
    assert {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= keys
    assert not any(k.startswith("cls.") for k in keys)

    hf, info = transformers.BertForSequenceClassification.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.id2label == dict(enumerate(CLASSES))
    adata = counts_adata(vocab, seed=1)
    sgf.pp.rank_tokenize(adata, vocab)
    ids, mask = padded_tokens(adata)
    with torch.no_grad():
        ours, theirs = clf(ids, mask), hf.eval()(ids, attention_mask=mask.long()).logits
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-5)

    again = GeneformerClassifier.from_pretrained(folder)
    assert again.classes == CLASSES and again.label_key == "kind"
    assert again.history == clf.history
    predict(adata, clf, key_added="before")
    predict(adata, again, key_added="after")
    assert (adata.obs["before_pred"] == adata.obs["after_pred"]).all()
    np.testing.assert_array_equal(adata.obsm["before_proba"], adata.obsm["after_proba"])


def test_token_classifier_round_trips_through_transformers(tmp_path, vocab):
    hf = hf_classifier(vocab, "BertForTokenClassification", seed=5)
    hf.save_pretrained(tmp_path / "official")
    clf = GeneformerClassifier.from_pretrained(tmp_path / "official", vocab)
    assert clf.task == "gene" and clf.pooler is None
    adata = counts_adata(vocab, seed=2)
    sgf.pp.rank_tokenize(adata, vocab)
    ids, mask = padded_tokens(adata)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask.long()).logits
        np.testing.assert_allclose(clf(ids, mask)[mask], expected[mask], rtol=0, atol=1e-5)

    folder = clf.save(tmp_path / "ours")
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "BertForTokenClassification"
    ]
    reloaded = transformers.BertForTokenClassification.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        again = reloaded(ids, attention_mask=mask.long()).logits
    np.testing.assert_allclose(again[mask], expected[mask], rtol=0, atol=1e-5)

    # A gene classifier applied to cells: each gene's probabilities averaged over its cells.
    predict(adata, clf, key_added="genes")
    proba = torch.softmax(expected, -1)[mask].numpy()
    token = ids[mask].numpy()
    for gene in vocab.genes[:10]:
        here = token == vocab.token_dict[gene]
        assert adata.var.loc[gene, "genes_n_cells"] == here.sum()
        if here.any():
            mean = proba[here].mean(axis=0)
            assert adata.var.loc[gene, "genes_pred"] == CLASSES[mean.argmax()]
            assert adata.var.loc[gene, "genes_score"] == pytest.approx(mean.max(), abs=1e-6)
        else:
            assert np.isnan(adata.var.loc[gene, "genes_score"])


def test_not_a_classifier_and_incomplete_heads_are_refused(tmp_path):
    vocab = small_vocab(60, cls=True, max_length=48)
    sgf.Geneformer.from_config("V1-10M", vocab, **TINY).save(tmp_path / "mlm")
    with pytest.raises(ValueError, match=r"not a classifier .*fine-tune it with sgf.tl.finetune"):
        GeneformerClassifier.from_pretrained(tmp_path / "mlm")

    hf_classifier(vocab, "BertForSequenceClassification").save_pretrained(tmp_path / "cut")
    path = tmp_path / "cut" / "model.safetensors"
    state = load_file(path)
    del state["bert.pooler.dense.bias"]
    save_file(state, path)
    with pytest.raises(ValueError, match=r"has no bert.pooler.dense.bias"):
        GeneformerClassifier.from_pretrained(tmp_path / "cut", vocab)


def test_tokens_of_another_vocabulary_are_refused(tmp_path):
    vocab = small_vocab(60, cls=True, max_length=48)
    model = sgf.Geneformer.from_config("V1-10M", vocab, **TINY)
    clf = GeneformerClassifier.from_encoder(model, CLASSES)
    adata = counts_adata(vocab)
    sgf.pp.rank_tokenize(adata, small_vocab(60, cls=True, seed=9, max_length=48, name="other"))
    with pytest.raises(ValueError, match=r"vocabulary 'other' .*Tokenize again with model.vocab"):
        predict(adata, clf)


@pytest.mark.parametrize("task", ["cell", "gene"])
def test_packed_batches_give_the_padded_logits(task):
    # CUDA runs cells packed without padding; on a CPU the same path runs through a stand-in.
    vocab = small_vocab(60, cls=False, max_length=48)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=1, **TINY)
    clf = GeneformerClassifier.from_encoder(model, CLASSES, task=task, random_state=2).eval()
    adata = counts_adata(vocab, n_cells=12, seed=4)
    sgf.pp.rank_tokenize(adata, vocab, max_length=40)
    tokens = adata.obsm["geneformer_tokens"]
    n_tokens = adata.obs["geneformer_n_tokens"].to_numpy()
    rows = np.array([5, 0, 11, 3])
    with torch.no_grad():
        packed, packed_ids = classifier_logits(clf, tokens, n_tokens, rows, packed=True)
        padded, padded_ids = classifier_logits(clf, tokens, n_tokens, rows, packed=False)
    assert packed.shape == padded.shape == ((4, 3) if task == "cell" else (n_tokens[rows].sum(), 3))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_ids, padded_ids, rtol=0, atol=0)
