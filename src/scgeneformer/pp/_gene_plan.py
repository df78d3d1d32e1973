"""Which columns of a count matrix feed which vocabulary tokens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._genes import describe_mismatch
from ..vocab import Vocabulary

# Below this fraction of the data's genes found in the vocabulary, something is likely off
# (wrong identifier column, another species). PBMC 3k with all 32,738 Ensembl genes maps 62%.
LOW_MATCH_FRACTION = 0.3


@dataclass(frozen=True)
class GenePlan:
    """Columns to tokens: each input column's token and median, and which columns share one.

    Attributes
    ----------
    column_token
        Token id of each input column, -1 outside the vocabulary.
    column_median
        Median of each column's token, NaN outside the vocabulary.
    column_shared
        -1 for a column that alone feeds its token; otherwise the column's slot in
        ``shared_token``, for tokens that several columns feed (their counts are summed).
    shared_token, shared_median
        Token and median of each shared slot.
    """

    column_token: np.ndarray
    column_median: np.ndarray
    column_shared: np.ndarray
    shared_token: np.ndarray
    shared_median: np.ndarray

    @property
    def n_mapped(self) -> int:
        """Input columns in the vocabulary."""
        return int((self.column_token >= 0).sum())

    @property
    def n_tokens(self) -> int:
        """Distinct vocabulary genes present."""
        return len(np.unique(self.column_token[self.column_token >= 0]))


def plan_genes(names: pd.Index, vocab: Vocabulary, *, gene_key: str | None) -> GenePlan:
    """Resolve gene names against ``vocab``; raise when none match, warn when few or duplicated.

    Examples
    --------
    >>> plan = plan_genes(adata.var_names, vocab, gene_key=None)  # doctest: +SKIP
    >>> plan.n_mapped  # doctest: +SKIP
    20331
    """
    column_token = vocab.tokens_for(names)
    mapped = column_token >= 0
    n_mapped = int(mapped.sum())
    if n_mapped == 0:
        raise ValueError(
            f"None of the {len(names):,} genes matches the vocabulary {vocab.name!r} "
            f"({vocab.n_genes:,} genes). " + describe_mismatch(names, vocab.genes, gene_key)
        )
    if n_mapped < LOW_MATCH_FRACTION * len(names):
        warnings.warn(
            f"Only {n_mapped:,} of {len(names):,} genes ({n_mapped / len(names):.1%}) match the "
            f"vocabulary {vocab.name!r}; cells will be ranked on those genes alone. "
            + describe_mismatch(names[~mapped], vocab.genes, gene_key),
            UserWarning,
            stacklevel=3,
        )
    medians = vocab.median_by_token
    column_median = np.where(mapped, medians[np.maximum(column_token, 0)], np.nan)
    unique_tokens, slot_of_column, columns_per_token = np.unique(
        column_token[mapped], return_inverse=True, return_counts=True
    )
    shared = columns_per_token > 1
    column_shared = np.full(len(names), -1, dtype=np.int64)
    if shared.any():
        dup_tokens = unique_tokens[shared]
        examples = [str(n) for n in names[np.isin(column_token, dup_tokens)][:4]]
        warnings.warn(
            f"{n_mapped - len(unique_tokens):,} genes map to a vocabulary gene that another "
            f"column also maps to (e.g. {examples}); their counts are summed, as Geneformer "
            "does.",
            UserWarning,
            stacklevel=3,
        )
        shared_slot = np.cumsum(shared) - 1
        column_is_shared = shared[slot_of_column]
        column_shared[np.flatnonzero(mapped)[column_is_shared]] = shared_slot[
            slot_of_column[column_is_shared]
        ]
    shared_token = unique_tokens[shared].astype(np.int64)
    return GenePlan(column_token, column_median, column_shared, shared_token, medians[shared_token])
