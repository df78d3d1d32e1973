"""Token-budget batching: group cells by length, pack them, and put results back in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from .._settings import settings

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_token_budget(token_budget: object) -> int:
    """Return the token budget to use (the setting when None); refuse one below 1 or no integer.

    Tools call this before tokenizing, so a bad budget costs nothing.

    Examples
    --------
    >>> check_token_budget(4096)
    4096
    """
    budget = settings.token_budget if token_budget is None else token_budget
    whole = isinstance(budget, float | np.floating) and float(budget).is_integer()  # 1e5
    if isinstance(budget, bool) or not (isinstance(budget, int | np.integer) or whole):
        raise TypeError(f"token_budget must be a whole number of tokens, got {budget!r}.")
    if budget < 1:
        raise ValueError(
            f"token_budget must be at least 1 token per batch, got {budget}; leave it out to "
            f"use sgf.settings.token_budget ({settings.token_budget:,})."
        )
    return int(budget)


def token_budget_batches(
    lengths: Sequence[int] | np.ndarray,
    token_budget: int | None = None,
    *,
    padded: bool = True,
    max_cells: int | None = None,
) -> list[np.ndarray]:
    """Group cells into batches of at most ``token_budget`` tokens.

    Cells are sorted by length, longest first, and cut greedily into consecutive runs, so cells
    of similar length share a batch and padding stays small. Longest first puts the biggest
    batch first, so running out of memory shows at once rather than at the end.

    Parameters
    ----------
    lengths
        Tokens per cell.
    token_budget
        Tokens per batch; default :attr:`scgeneformer.settings.token_budget`.
    padded
        If True a batch costs ``n_cells * longest`` (a padded matrix); if False it costs the
        sum of the lengths (cells packed without padding).
    max_cells
        Optional cap on cells per batch.

    Returns
    -------
    Index arrays into ``lengths``, one per batch; every cell is in exactly one. A cell longer
    than the budget gets a batch of its own. Empty cells count as one token.

    Examples
    --------
    >>> from scgeneformer.data import token_budget_batches
    >>> [b.tolist() for b in token_budget_batches([3, 8, 5, 2], 10)]
    [[1], [2, 0], [3]]
    """
    budget = settings.token_budget if token_budget is None else int(token_budget)
    if budget < 1:
        raise ValueError(f"token_budget must be positive, got {budget}.")
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"max_cells must be positive, got {max_cells}.")
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and (lengths < 0).any()):
        raise ValueError("lengths must be a 1-d array of non-negative integers.")
    order = np.argsort(-lengths, kind="stable")
    costs = np.maximum(lengths[order].astype(np.int64), 1)
    cumulative = np.cumsum(costs)
    cap = len(order) if max_cells is None else int(max_cells)
    batches = []
    start = 0
    while start < len(order):
        if padded:
            # Sorted longest first, so the first cell sets the padded width of the batch.
            n = int(budget // costs[start])
        else:
            spent = cumulative[start - 1] if start else 0
            n = int(np.searchsorted(cumulative, spent + budget, side="right")) - start
        stop = start + min(max(n, 1), cap)
        batches.append(order[start:stop])
        start = stop
    return batches


def restore_order(results: Sequence[ArrayT], batches: Sequence[np.ndarray]) -> ArrayT:
    """Concatenate per-batch results and put their rows back in input order.

    Parameters
    ----------
    results
        One array or tensor per batch, first axis aligned with that batch's indices.
    batches
        The index arrays from :func:`token_budget_batches`, which must cover ``0..n-1`` once.

    Returns
    -------
    Rows in the order of the original cells (numpy or torch, as given).

    Examples
    --------
    >>> batches = token_budget_batches([3, 8, 5, 2], 10)
    >>> restore_order([np.array([b.tolist()]).T * 10 for b in batches], batches).ravel().tolist()
    [0, 10, 20, 30]
    """
    if len(results) != len(batches):
        raise ValueError(f"Got {len(results)} results for {len(batches)} batches.")
    order = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
    for result, batch in zip(results, batches, strict=True):
        if len(result) != len(batch):
            raise ValueError(f"A result has {len(result)} rows for a batch of {len(batch)} cells.")
    if not np.array_equal(np.sort(order), np.arange(len(order))):
        raise ValueError("The batches do not cover every cell exactly once.")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    if isinstance(results[0], torch.Tensor):
        stacked = torch.cat(list(results))
        return stacked[torch.as_tensor(inverse, device=stacked.device)]
    return np.concatenate(list(results))[inverse]


def pack_tokens(
    tokens: np.ndarray | torch.Tensor, lengths: Sequence[int] | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pack right-padded token rows into the flat layout of the packed model path.

    Parameters
    ----------
    tokens
        ``(cells, width)`` token ids, each row's real tokens first (as in
        ``obsm["geneformer_tokens"]``).
    lengths
        Real tokens per row.

    Returns
    -------
    ``(tokens, cu_seqlens, max_seqlen)``: int64 ids ``(sum(lengths),)``, int32 offsets
    ``(cells + 1,)`` and the longest length, ready for
    :meth:`scgeneformer.Geneformer.hidden_states_packed`.

    Examples
    --------
    >>> flat, cu, longest = pack_tokens(np.array([[5, 6, 0], [7, 8, 9]]), [2, 3])
    >>> flat.tolist(), cu.tolist(), longest
    ([5, 6, 7, 8, 9], [0, 2, 5], 3)
    """
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind == "u":
        # Token stores hold uint16, which older torch (2.4, tested) cannot index on the CPU.
        tokens = tokens.astype(np.int64)
    tokens = torch.as_tensor(tokens)
    lengths_t = torch.as_tensor(np.asarray(lengths, dtype=np.int64), device=tokens.device)
    if tokens.ndim != 2 or lengths_t.shape != (tokens.shape[0],):
        raise ValueError(
            f"tokens must be (cells, width) with one length per row; got {tuple(tokens.shape)} "
            f"and {tuple(lengths_t.shape)} lengths."
        )
    if lengths_t.numel() and (lengths_t.min() < 0 or lengths_t.max() > tokens.shape[1]):
        raise ValueError(f"lengths must lie in [0, {tokens.shape[1]}] (the row width).")
    keep = torch.arange(tokens.shape[1], device=tokens.device) < lengths_t[:, None]
    cu_seqlens = torch.zeros(len(lengths_t) + 1, dtype=torch.int32, device=tokens.device)
    cu_seqlens[1:] = torch.cumsum(lengths_t, 0)
    max_seqlen = int(lengths_t.max()) if lengths_t.numel() else 0
    return tokens[keep].long(), cu_seqlens, max_seqlen


@dataclass(frozen=True)
class CellBatch:
    """The token rows of one batch on the device, packed end to end or right-padded.

    Packed: ``ids`` is ``(tokens,)`` with int32 offsets ``cu_seqlens`` and ``mask`` is None.
    Padded: ``ids`` is ``(cells, width)`` with ``mask`` marking real tokens.
    """

    ids: torch.Tensor
    mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int

    @property
    def packed(self) -> bool:
        """Whether the cells are packed without padding."""
        return self.cu_seqlens is not None

    @property
    def real_ids(self) -> torch.Tensor:
        """The real tokens' ids, flattened in cell order."""
        return self.ids if self.packed else self.ids[self.mask]

    def inputs(self) -> dict[str, Any]:
        """Keyword arguments for the model's ``forward`` (padded or packed layout)."""
        if self.packed:
            return {
                "input_ids": self.ids,
                "cu_seqlens": self.cu_seqlens,
                "max_seqlen": self.max_seqlen,
            }
        return {"input_ids": self.ids, "attention_mask": self.mask}


def cell_batch(
    tokens: np.ndarray, lengths: np.ndarray, *, packed: bool, device: torch.device
) -> CellBatch:
    """Move token rows of one batch to ``device``, packed or padded to the longest row.

    Examples
    --------
    >>> batch = cell_batch(np.array([[5, 6, 0], [7, 8, 9]]), np.array([2, 3]),
    ...                    packed=False, device=torch.device("cpu"))
    >>> batch.ids.shape, batch.real_ids.tolist()
    (torch.Size([2, 3]), [5, 6, 7, 8, 9])
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if packed:
        flat, cu, longest = pack_tokens(np.asarray(tokens).astype(np.int64), lengths)
        return CellBatch(flat.to(device), None, cu.to(device), longest)
    width = int(lengths.max(initial=0))
    ids = torch.as_tensor(np.asarray(tokens)[:, :width].astype(np.int64), device=device)
    mask = torch.arange(width, device=device) < torch.as_tensor(lengths, device=device)[:, None]
    return CellBatch(ids, mask, None, width)
