"""Token-budget batching: every cell once, budget kept, little padding, order restored."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scgeneformer as sgf
from scgeneformer.data import pack_tokens, restore_order, token_budget_batches

lengths_strategy = st.lists(st.integers(0, 300), min_size=0, max_size=200)


@settings(max_examples=150, deadline=None)
@given(
    lengths=lengths_strategy,
    budget=st.integers(1, 2_000),
    padded=st.booleans(),
    max_cells=st.one_of(st.none(), st.integers(1, 50)),
)
def test_every_cell_once_and_budget_respected(lengths, budget, padded, max_cells):
    lengths = np.array(lengths, dtype=np.int64)
    batches = token_budget_batches(lengths, budget, padded=padded, max_cells=max_cells)
    order = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    for batch in batches:
        cost = np.maximum(lengths[batch], 1)
        spent = len(batch) * cost.max() if padded else cost.sum()
        assert spent <= budget or len(batch) == 1  # only a lone over-long cell may exceed it
        assert max_cells is None or len(batch) <= max_cells
    # Greedy: a batch could not have taken the next cell without breaking the budget.
    for batch, following in itertools.pairwise(batches):
        cost = np.maximum(lengths[np.append(batch, following[0])], 1)
        spent = (len(batch) + 1) * cost.max() if padded else cost.sum()
        assert spent > budget or (max_cells is not None and len(batch) == max_cells)


def test_batches_group_similar_lengths_so_padding_is_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 2048, 5_000)
    batches = token_budget_batches(lengths, 16_384)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded / lengths.sum() < 1.05
    assert lengths[batches[0]].max() == lengths.max()  # the biggest batch comes first


def test_default_budget_comes_from_settings(monkeypatch):
    monkeypatch.setattr(sgf.settings, "token_budget", 100)
    assert [len(b) for b in token_budget_batches([10] * 25)] == [10, 10, 5]


@pytest.mark.parametrize("as_torch", [False, True])
def test_restore_order_puts_results_back(as_torch):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, 57)
    batches = token_budget_batches(lengths, 500)
    assert len(batches) > 5
    results = [np.stack([lengths[b], b], axis=1) for b in batches]
    if as_torch:
        results = [torch.from_numpy(r) for r in results]
    restored = restore_order(results, batches)
    assert isinstance(restored, torch.Tensor) == as_torch
    np.testing.assert_array_equal(np.asarray(restored)[:, 1], np.arange(57))
    np.testing.assert_array_equal(np.asarray(restored)[:, 0], lengths)


def test_restore_order_refuses_mismatches():
    batches = [np.array([1, 0]), np.array([2])]
    with pytest.raises(ValueError, match="rows for a batch of 1 cells"):
        restore_order([np.zeros(2), np.zeros(2)], batches)
    with pytest.raises(ValueError, match="every cell exactly once"):
        restore_order([np.zeros(2), np.zeros(1)], [np.array([1, 0]), np.array([1])])
    with pytest.raises(ValueError, match="Got 1 results for 2 batches"):
        restore_order([np.zeros(2)], batches)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="token_budget must be positive"):
        token_budget_batches([1, 2], 0)
    with pytest.raises(ValueError, match="non-negative"):
        token_budget_batches([1, -2], 10)
    with pytest.raises(ValueError, match="max_cells must be positive"):
        token_budget_batches([1, 2], 10, max_cells=0)


def test_pack_tokens_drops_padding_and_builds_offsets():
    tokens = np.array([[5, 6, 0, 0], [7, 8, 9, 4], [0, 0, 0, 0]], dtype=np.uint16)
    flat, cu, longest = pack_tokens(tokens, [2, 4, 0])
    assert flat.dtype == torch.int64 and cu.dtype == torch.int32
    assert flat.tolist() == [5, 6, 7, 8, 9, 4] and cu.tolist() == [0, 2, 6, 6] and longest == 4
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        pack_tokens(tokens, [2, 5, 0])
    with pytest.raises(ValueError, match="one length per row"):
        pack_tokens(tokens, [2, 4])
