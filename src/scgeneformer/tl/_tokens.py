"""The token slots a tool reads: made with the model's vocabulary, or made now."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from .._slots import TOKENS_KEY, read_n_tokens, tokens_slot, warn_if_tokens_outside_var
from ..model import Geneformer
from ..pp import rank_tokenize


def cell_tokens(
    adata: AnnData, model: Geneformer, *, key: str = TOKENS_KEY
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(tokens, n_tokens)`` for ``adata``'s cells, checked against ``model``'s vocabulary.

    When ``obsm[f"{key}_tokens"]`` is absent, the cells are tokenized first with the model's
    vocabulary (which writes the tokenization slots, see :func:`~scgeneformer.pp.rank_tokenize`).
    Tokens made with another vocabulary are refused.

    Examples
    --------
    >>> tokens, n_tokens = cell_tokens(adata, model)  # doctest: +SKIP
    """
    if tokens_slot(key) not in adata.obsm:
        rank_tokenize(adata, model.vocab, key_added=key)
    info = adata.uns.get(key)
    if not isinstance(info, dict) or "vocabulary_sha256" not in info:
        raise ValueError(
            f"adata.obsm['{key}_tokens'] exists but adata.uns['{key}'] does not say which "
            "vocabulary made it; re-run sgf.pp.rank_tokenize(adata, model.vocab)."
        )
    model.check_tokens_vocabulary(info["vocabulary_sha256"], info.get("vocabulary_name"))
    tokens = np.asarray(adata.obsm[tokens_slot(key)])
    n_tokens = read_n_tokens(adata, key, width=tokens.shape[1] if tokens.ndim == 2 else None)
    warn_if_tokens_outside_var(adata, tokens, model.vocab.special_tokens.values(), key)
    if n_tokens.max(initial=0) > model.max_length:
        raise ValueError(
            f"Cells hold up to {n_tokens.max()} tokens, more than the model's "
            f"{model.max_length} positions; re-tokenize with max_length={model.max_length}."
        )
    return tokens, n_tokens
