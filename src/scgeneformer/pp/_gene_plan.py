"""Which columns of a count matrix feed which vocabulary tokens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._genes import describe_mismatch
from ..vocab import Vocabulary
from ._chunks import shared_columns

# Below this fraction of the data's genes found in the vocabulary, something is likely off
# (wrong identifier column, another species). PBMC 3k with all 32,738 Ensembl genes maps 62%.
LOW_MATCH_FRACTION = 0.3


@dataclass(frozen=True)
class GenePlan:
    """Columns to tokens: each input column's token, and which columns share one.

    Attributes
    ----------
    column_token
        Token id of each input column, -1 outside the vocabulary.
    column_shared, shared_token
        See :func:`shared_columns`: columns that feed the same token, summed by the kernels.
    median_by_token
        Each token's median (the vocabulary's).
    """

    column_token: np.ndarray
    column_shared: np.ndarray
    shared_token: np.ndarray
    median_by_token: np.ndarray

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
            f"({vocab.n_genes:,} genes). "
            + describe_mismatch(names, vocab.genes, gene_key, has_cls=vocab.has_cls)
        )
    if n_mapped < LOW_MATCH_FRACTION * len(names):
        warnings.warn(
            f"Only {n_mapped:,} of {len(names):,} genes ({n_mapped / len(names):.1%}) match the "
            f"vocabulary {vocab.name!r}; cells will be ranked on those genes alone. "
            + describe_mismatch(names[~mapped], vocab.genes, gene_key, has_cls=vocab.has_cls),
            UserWarning,
            stacklevel=3,
        )
    column_shared, shared_token = shared_columns(column_token)
    if len(shared_token):
        examples = [str(n) for n in names[np.isin(column_token, shared_token)][:4]]
        n_extra = int((column_shared >= 0).sum()) - len(shared_token)
        warnings.warn(
            f"{n_extra:,} genes map to a vocabulary gene that another column also maps to "
            f"(e.g. {examples}); their counts are summed, as Geneformer does.",
            UserWarning,
            stacklevel=3,
        )
    return GenePlan(column_token, column_shared, shared_token, vocab.median_by_token)
