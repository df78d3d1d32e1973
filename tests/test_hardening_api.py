"""Hostile input and faults at the public API (issue 12): each gets a clear error or is handled.

Every test here failed before its fix. None catches an exception to pass: errors are asserted
with ``pytest.raises(..., match=...)`` on the package's own message.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import scgeneformer as sgf

from .test_in_silico import TINY


@pytest.fixture(scope="module")
def small():
    """A tiny model and tokenized two-state cells; tests copy ``adata`` before changing it."""
    adata = sgf.datasets.synthetic_states(n_cells=60, n_genes=120, random_state=5)
    vocab = sgf.Vocabulary.build(adata, max_length=128)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    sgf.pp.rank_tokenize(adata, vocab)
    return adata, model


# ---------------------------------------------------------------- item 6: train/eval race
def test_threads_embedding_one_training_mode_model_see_no_dropout_and_leave_its_mode(small):
    adata, model = small
    model = sgf.Geneformer.from_config(
        "V1-10M",
        model.vocab,
        random_state=1,
        **{**TINY, "hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5},
    )
    reference = adata.copy()
    sgf.tl.embed(reference, model.eval())
    model.train()
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        copy = adata.copy()
        for _ in range(3):
            sgf.tl.embed(copy, model, token_budget=256)
        results[i] = copy.obsm["X_geneformer"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert model.training  # inference never flips the shared module's mode
    for out in results.values():
        np.testing.assert_allclose(out, reference.obsm["X_geneformer"], rtol=1e-5, atol=1e-6)


def test_dropout_still_runs_in_training_outside_inference(small):
    _, model = small
    layer = sgf.model._encoder.Dropout(0.5).train()
    out = layer(torch.ones(1000))
    assert (out == 0).any()  # the subclass is still dropout when it should be
    with sgf.model._encoder.dropout_disabled():
        assert (layer(torch.ones(1000)) == 1).all()
    assert model.training is model.training  # nothing global was touched


# ---------------------------------------------------------------- item 2: non-finite pooling
def test_embed_warns_when_cells_with_tokens_pool_to_nan(small):
    adata, model = small
    broken = sgf.Geneformer.from_config("V1-10M", model.vocab, random_state=0, **TINY)
    with torch.no_grad():
        broken.bert.encoder.layer[0].output.dense.bias.fill_(float("nan"))
    adata = adata.copy()
    with pytest.warns(UserWarning, match=r"60 of 60 cells with tokens pooled to a non-finite"):
        sgf.tl.embed(adata, broken)
