"""The token slots a tool reads: made with the model's vocabulary, or made now."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from .._slots import (
    TOKENS_KEY,
    n_tokens_slot,
    read_n_tokens,
    tokens_slot,
    warn_if_tokens_outside_var,
)
from ..model import Geneformer
from ..pp import rank_tokenize

# Rows checked at a time: bounds the temporary arrays of the check on a large AnnData.
_CHECK_ROWS = 8192


def cell_tokens(
    adata: AnnData,
    model: Geneformer,
    *,
    key: str = TOKENS_KEY,
    layer: str | None = None,
    gene_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(tokens, n_tokens)`` for ``adata``'s cells, checked against ``model``'s vocabulary.

    When ``obsm[f"{key}_tokens"]`` is absent, the cells are tokenized first with the model's
    vocabulary, from ``layer`` with the gene ids in ``var[gene_key]`` (which writes the
    tokenization slots, see :func:`~scgeneformer.pp.rank_tokenize`). Tokens made with another
    vocabulary are refused, and so are ids outside it and token counts that disagree with the
    rows, here on the CPU, before any model runs.

    Examples
    --------
    >>> tokens, n_tokens = cell_tokens(adata, model)  # doctest: +SKIP
    """
    if tokens_slot(key) not in adata.obsm:
        rank_tokenize(adata, model.vocab, layer=layer, gene_key=gene_key, key_added=key)
    info = adata.uns.get(key)
    if not isinstance(info, dict) or "vocabulary_sha256" not in info:
        raise ValueError(
            f"adata.obsm['{key}_tokens'] exists but adata.uns['{key}'] does not say which "
            "vocabulary made it; re-run sgf.pp.rank_tokenize(adata, model.vocab)."
        )
    model.check_tokens_vocabulary(info["vocabulary_sha256"], info.get("vocabulary_name"))
    tokens = np.asarray(adata.obsm[tokens_slot(key)])
    n_tokens = read_n_tokens(adata, key, width=tokens.shape[1] if tokens.ndim == 2 else None)
    if n_tokens.max(initial=0) > model.max_length:
        raise ValueError(
            f"Cells hold up to {n_tokens.max()} tokens, more than the model's "
            f"{model.max_length} positions; re-tokenize with max_length={model.max_length}."
        )
    check_token_rows(tokens, n_tokens, model, key)
    # After the id check: a wild id would otherwise size the warning's lookup table.
    warn_if_tokens_outside_var(adata, tokens, model.vocab.special_tokens.values(), key)
    return tokens, n_tokens


def check_token_rows(tokens: np.ndarray, n_tokens: np.ndarray, model: Geneformer, key: str) -> None:
    """Refuse token rows with ids outside the model's vocabulary, or counts that disagree.

    Rows are right-padded with ``<pad>`` (0), which no real token is, so each row's non-pad
    count must equal ``obs[f"{key}_n_tokens"]``; otherwise tokens past a cell's count would be
    read as its genes in a batch with longer cells, or its own genes cut off.

    Examples
    --------
    >>> check_token_rows(np.array([[5, 9, 0]]), np.array([2]), model, "geneformer")
    """
    where = f"adata.obsm['{tokens_slot(key)}']"
    if tokens.ndim != 2 or len(tokens) != len(n_tokens):
        raise ValueError(
            f"{where} must be a (cells, length) matrix with one row per cell, got shape "
            f"{tokens.shape} for {len(n_tokens)} cells; re-run sgf.pp.rank_tokenize."
        )
    for start in range(0, len(tokens), _CHECK_ROWS):
        rows = np.asarray(tokens[start : start + _CHECK_ROWS])
        model.check_token_ids(rows, where=where)
        counted = (rows != model.vocab.pad_id).sum(axis=1)
        wrong = np.flatnonzero(counted != n_tokens[start : start + _CHECK_ROWS])
        if len(wrong):
            cell = start + int(wrong[0])
            raise ValueError(
                f"obs['{n_tokens_slot(key)}'] disagrees with {where}: cell {cell} has "
                f"{int(counted[wrong[0]])} tokens in its row but a count of "
                f"{int(n_tokens[cell])}. Were the slots edited or subset apart? Re-run "
                "sgf.pp.rank_tokenize."
            )
