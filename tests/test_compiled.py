"""`sgf.settings.compile`: the compiled encoder gives the eager numbers and does not recompile
per batch; guards of the packed path."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import scgeneformer as sgf
from scgeneformer._plan import execution_plan
from scgeneformer.data import pack_tokens
from scgeneformer.tl import _compiled

from .conftest import small_vocab
from .test_embed import counts_adata, tiny_model


@pytest.fixture
def counting_compiler(monkeypatch):
    """Compile with a backend that counts the graphs it is handed (and runs them as traced)."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = functools.lru_cache(maxsize=1)(
        lambda: (
            torch.compile(_compiled._padded_layers, dynamic=True, backend=backend),
            torch.compile(_compiled._packed_layers, dynamic=True, backend=backend),
        )
    )
    monkeypatch.setattr(_compiled, "_compiled", compiled)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def random_batch(rng, vocab, max_cells=6, max_length=60):
    n = int(rng.integers(1, max_cells + 1))
    lengths = rng.integers(2, max_length + 1, n)
    tokens = np.zeros((n, lengths.max()), dtype=np.int64)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.choice(vocab.gene_token_ids, length, replace=False)
    return tokens, lengths


def test_compiled_encoder_equals_eager_and_does_not_recompile_per_batch(counting_compiler):
    vocab = small_vocab(80, cls=False, max_length=64)
    model = tiny_model(vocab).eval()
    plan = execution_plan("cpu", "float32")
    eager = _compiled.EncoderRunner(model, plan)
    compiled = _compiled.EncoderRunner(model, plan)
    compiled.compiled = True
    rng = np.random.default_rng(0)
    shapes = set()
    with torch.inference_mode():
        for _ in range(16):
            tokens, lengths = random_batch(rng, vocab)
            ids = torch.as_tensor(tokens)
            keep = ids != 0
            a = compiled.padded(ids, keep, layer=2)
            b = eager.padded(ids, keep, layer=2)
            torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
            flat, cu, longest = pack_tokens(tokens, lengths)
            a = compiled.packed(flat, cu, longest, layer=3)
            b = eager.packed(flat, cu, longest, layer=3)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            shapes |= {("padded", *ids.shape), ("packed", len(flat), len(cu))}
    # Graphs: padded with and without a mask, packed with one cell and with several (torch
    # 2.13 specialises sizes 0 and 1 only); not one per shape.
    assert len(shapes) >= 28
    assert 2 <= len(counting_compiler) <= 4
    assert model.bert.forward.__func__ is type(model.bert).forward  # restored after each call


def test_settings_compile_runs_embed_and_screens_through_the_compiled_encoder(
    counting_compiler, monkeypatch
):
    vocab = small_vocab(30, cls=True, max_length=64)
    model = tiny_model(vocab)
    adata = counts_adata(vocab, n_cells=16, seed=2)
    adata.obs["state"] = np.where(np.arange(16) < 8, "a", "b")
    eager = adata.copy()
    sgf.tl.embed(eager, model)
    sgf.tl.in_silico_delete(
        eager, model, state_key="state", start_state="a", goal_state="b", max_cells=2
    )
    monkeypatch.setattr(sgf.settings, "compile", True)
    sgf.tl.embed(adata, model)
    sgf.tl.in_silico_delete(
        adata, model, state_key="state", start_state="a", goal_state="b", max_cells=2
    )
    assert counting_compiler  # the compiled path ran
    assert adata.uns["X_geneformer"]["execution_plan"]["compile"] is True
    np.testing.assert_allclose(adata.obsm["X_geneformer"], eager.obsm["X_geneformer"], atol=1e-5)
    np.testing.assert_allclose(
        adata.var["in_silico_delete_shift"], eager.var["in_silico_delete_shift"], atol=1e-6
    )


def test_compiled_layers_use_the_mode_without_cuda_graphs(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    _compiled._compiled.cache_clear()
    try:
        _compiled._compiled()
    finally:
        _compiled._compiled.cache_clear()
    assert seen == [{"dynamic": True, "mode": "default"}] * 2


def test_packed_path_never_takes_more_tokens_than_the_last_offset():
    vocab = small_vocab(30, cls=False, max_length=64)
    model = tiny_model(vocab).eval()
    flat, cu, longest = pack_tokens(np.array([[5, 6, 7], [8, 9, 0]]), [3, 2])
    extra = torch.cat([flat, torch.tensor([5])])  # one token past the last offset
    with pytest.raises(ValueError, match="last offset"):
        model.hidden_states_packed(extra, cu, longest, validate=False)
    with pytest.raises(ValueError, match="last offset"):
        model.hidden_states_packed(extra, cu.numpy(), longest, validate=False)
    assert model.hidden_states_packed(flat, cu, longest, validate=False).shape[0] == 5
