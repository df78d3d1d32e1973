"""Combinations with an anchor gene: the anchor deleted together with each other gene.

As Geneformer's combination screens: in every start cell that has the anchor, the anchor is
deleted alone and together with each other gene deleted exactly. The interaction of a gene
is ``combined - (anchor alone + gene alone)``, per cell, then averaged: positive when the
two deletions together move the cell further (toward the goal, or away from itself without
states) than their separate effects added up (synergy); negative when less (redundancy: the
two genes carry overlapping information in the model).
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import Geneformer


def anchor_token(model: Geneformer, anchor_gene: str) -> int:
    """Return the anchor's token id, or refuse a gene the vocabulary lacks."""
    token = int(model.vocab.tokens_for([str(anchor_gene)])[0])
    if token < 0:
        raise ValueError(
            f"anchor_gene={anchor_gene!r} is not in the vocabulary {model.vocab.name!r}. Use "
            f"its gene ID (e.g. {model.vocab.genes[:2]}) or a symbol its mapping knows."
        )
    return token


def check_anchor_present(
    tokens: np.ndarray, n_tokens: np.ndarray, start: np.ndarray, token: int, anchor_gene: str
) -> int:
    """Count the start cells with the anchor; refuse when there are none."""
    width = np.arange(tokens.shape[1])[None, :] < n_tokens[start, None]
    count = int(((tokens[start] == token) & width).any(axis=1).sum())
    if count == 0:
        raise ValueError(
            f"anchor_gene={anchor_gene!r} is in none of the {len(start)} start cells' token "
            "lists (not expressed, or ranked past the tokenization length); choose a gene "
            "the start state expresses."
        )
    return count


def anchor_variants(
    row: torch.Tensor, anchor_at: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the cell without the anchor ``(1, L-1)``, and without it and each of ``positions``.

    Examples
    --------
    >>> alone, pairs = anchor_variants(torch.tensor([2, 10, 11, 12, 3]), 2, torch.tensor([1, 3]))
    >>> alone.tolist(), pairs.tolist()
    ([[2, 10, 12, 3]], [[2, 12, 3], [2, 10, 3]])
    """
    keep = torch.ones(row.numel(), dtype=torch.bool, device=row.device)
    keep[anchor_at] = False
    pairs = keep[None, :].repeat(positions.numel(), 1)
    pairs[torch.arange(positions.numel(), device=row.device), positions] = False
    both = row[None, :].expand(positions.numel(), -1)[pairs]
    return row[keep][None, :], both.view(positions.numel(), row.numel() - 2)
