"""Masked-gene modelling: which positions, how they are corrupted, and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scgeneformer.data._masking import GeneMasker, batch_generator

from .conftest import small_vocab


def framed_batch(vocab, lengths, seed=0):
    """Right-padded cells of distinct random genes between <cls> and <eos>."""
    rng = np.random.default_rng(seed)
    genes = vocab.gene_token_ids
    tokens = np.zeros((len(lengths), max(lengths) + 2), dtype=np.int64)
    for row, n in enumerate(lengths):
        tokens[row, 1 : n + 1] = rng.choice(genes, n, replace=False)
        tokens[row, 0], tokens[row, n + 1] = vocab.cls_id, vocab.eos_id
    return torch.from_numpy(tokens)


def test_only_gene_positions_are_chosen_and_labels_are_the_originals():
    vocab = small_vocab(200)
    masker = GeneMasker(vocab, 0.15)
    tokens = framed_batch(vocab, [100, 7, 1, 40, 2])
    batch = masker(tokens, batch_generator(1))
    special = torch.tensor(list(vocab.special_tokens.values()))
    assert not torch.isin(tokens[batch.positions], special).any()
    assert torch.equal(batch.labels, tokens[batch.positions])
    # Outside the chosen positions nothing changes.
    assert torch.equal(batch.input_ids[~batch.positions], tokens[~batch.positions])
    # round(0.15 n) per cell, at least one.
    assert batch.positions.sum(dim=1).tolist() == [15, 1, 1, 6, 1]


def test_corruption_shares_are_80_10_10_and_random_tokens_are_genes():
    vocab = small_vocab(300)
    masker = GeneMasker(vocab, 0.15)
    tokens = framed_batch(vocab, [200] * 400, seed=3)
    batch = masker(tokens, batch_generator(7))
    chosen_in = batch.input_ids[batch.positions]
    is_mask = chosen_in == vocab.mask_id
    unchanged = chosen_in == batch.labels
    random = ~is_mask & ~unchanged
    n = batch.n_masked
    assert n == 400 * 30
    assert is_mask.float().mean() == pytest.approx(0.8, abs=0.015)
    # A random gene may by chance be the original gene (1 in 300): counted as unchanged.
    assert random.float().mean() == pytest.approx(0.1 * 299 / 300, abs=0.01)
    assert unchanged.float().mean() == pytest.approx(0.1 + 0.1 / 300, abs=0.01)
    assert torch.isin(chosen_in[random], torch.as_tensor(vocab.gene_token_ids)).all()


def test_masks_depend_only_on_the_seed():
    vocab = small_vocab(50)
    masker = GeneMasker(vocab, 0.3)
    tokens = framed_batch(vocab, [30, 12, 5])
    a = masker(tokens, batch_generator(0, 1, 2))
    b = masker(tokens, batch_generator(0, 1, 2))
    c = masker(tokens, batch_generator(0, 1, 3))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
    assert not torch.equal(a.positions, c.positions)


def test_v1_vocabulary_without_cls_and_bad_fractions():
    vocab = small_vocab(30, cls=False)
    masker = GeneMasker(vocab, 0.5)
    tokens = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    batch = masker(tokens, batch_generator(0))
    assert batch.positions.sum(dim=1).tolist() == [2, 1, 0]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="mask_fraction"):
            GeneMasker(vocab, bad)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31),
)
def test_invariants_hold_for_any_batch(lengths, fraction, seed):
    vocab = small_vocab(80)
    tokens = framed_batch(vocab, lengths, seed=seed % 1000)
    tokens[torch.tensor(lengths) == 0] = 0  # a cell without genes has no tokens at all
    batch = GeneMasker(vocab, fraction)(tokens, batch_generator(seed))
    expected = [0 if n == 0 else max(1, int(np.floor(n * fraction + 0.5))) for n in lengths]
    assert batch.positions.sum(dim=1).tolist() == expected
    assert torch.isin(batch.labels, torch.as_tensor(vocab.gene_token_ids)).all()
    assert (batch.input_ids[~batch.positions] == tokens[~batch.positions]).all()
