"""Which columns of a count matrix feed which vocabulary tokens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._genes import describe_mismatch
from ..vocab import Vocabulary

# Below this fraction of the data's genes found in the vocabulary, something is likely off
# (wrong identifier column, another species). PBMC 3k with all 32,738 Ensembl genes maps 62%.
LOW_MATCH_FRACTION = 0.3


@dataclass(frozen=True)
class GenePlan:
    """Columns to tokens: ``column_token`` per input column, and how duplicates are summed.

    Attributes
    ----------
    column_token
        Token id of each input column, -1 outside the vocabulary.
    collapse
        ``None`` when every token comes from one column; otherwise a 0/1 CSR matrix
        (columns x slots) that sums the columns of each token into one slot.
    kernel_token, kernel_median
        Token and median of each column the kernel sees (input columns, or slots).
    """

    column_token: np.ndarray
    collapse: sp.csr_matrix | None
    kernel_token: np.ndarray
    kernel_median: np.ndarray

    @property
    def n_mapped(self) -> int:
        """Input columns in the vocabulary."""
        return int((self.column_token >= 0).sum())

    @property
    def n_tokens(self) -> int:
        """Distinct vocabulary genes present."""
        return len(np.unique(self.column_token[self.column_token >= 0]))

    def prepare(self, chunk: sp.csr_matrix) -> sp.csr_matrix:
        """Sum the columns that share a token (a no-op when none do)."""
        return chunk if self.collapse is None else (chunk @ self.collapse).tocsr()


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
    unique_tokens, slot_of_column = np.unique(column_token[mapped], return_inverse=True)
    if len(unique_tokens) == n_mapped:
        kernel_median = np.where(mapped, medians[np.maximum(column_token, 0)], np.nan)
        return GenePlan(column_token, None, column_token, kernel_median)

    columns = np.flatnonzero(mapped)
    dup_tokens = unique_tokens[np.bincount(slot_of_column) > 1]
    examples = [str(n) for n in names[np.isin(column_token, dup_tokens)][:4]]
    warnings.warn(
        f"{n_mapped - len(unique_tokens):,} genes map to a vocabulary gene that another column "
        f"also maps to (e.g. {examples}); their counts are summed, as Geneformer does.",
        UserWarning,
        stacklevel=3,
    )
    collapse = sp.csr_matrix(
        (np.ones(len(columns)), (columns, slot_of_column)),
        shape=(len(names), len(unique_tokens)),
    )
    return GenePlan(column_token, collapse, unique_tokens, medians[unique_tokens])
