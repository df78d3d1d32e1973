"""The AnnData slots that the tokenizer writes and the tools read, and the lookups made on them.

:func:`scgeneformer.pp.rank_tokenize` writes, under its ``key_added`` (``"geneformer"`` by
default), ``obsm[f"{key}_tokens"]``, ``obs[f"{key}_n_tokens"]``, ``var[f"{key}_token"]`` and
``uns[key]``. Every other module names those slots through the functions here, and maps
per-token results onto ``var`` rows with :func:`token_values_to_var` and
:func:`table_to_var`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

TOKENS_KEY = "geneformer"


def tokens_slot(key: str = TOKENS_KEY) -> str:
    """``obsm`` key of the right-padded token rows."""
    return f"{key}_tokens"


def n_tokens_slot(key: str = TOKENS_KEY) -> str:
    """``obs`` key of the number of tokens per cell."""
    return f"{key}_n_tokens"


def var_token_slot(key: str = TOKENS_KEY) -> str:
    """``var`` key of each gene's token id (-1 where the gene is not in the vocabulary)."""
    return f"{key}_token"


def tokenization_slots(key: str = TOKENS_KEY) -> dict[str, str]:
    """Return, per AnnData attribute, the slot :func:`~scgeneformer.pp.rank_tokenize` writes."""
    return {
        "obsm": tokens_slot(key),
        "obs": n_tokens_slot(key),
        "var": var_token_slot(key),
        "uns": key,
    }


def check_key_added(key_added: object, writes: Mapping[str, Iterable[str]], *, tool: str) -> None:
    """Refuse a ``key_added`` that is no name, or whose slots would overwrite the tokens.

    Every tool with a ``key_added`` calls this before any work. The tokenization slots are
    what every other tool reads; a result written over them destroys the tokens (or their
    provenance in ``uns``) without a word.

    Parameters
    ----------
    key_added
        The user's value.
    writes
        The slots the tool would write with it: attribute name (``"obsm"``, ``"var"``,
        ...) to the keys.
    tool
        The tool's name, for the message.

    Examples
    --------
    >>> check_key_added("X_geneformer", {"obsm": ["X_geneformer"]}, tool="tl.embed")
    >>> check_key_added(
    ...     "geneformer_tokens", {"obsm": ["geneformer_tokens"]}, tool="tl.embed"
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tl.embed(key_added='geneformer_tokens') would write ...
    """
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"{tool}: key_added must be a non-empty string, got {key_added!r}.")
    owned = tokenization_slots()
    for attribute, keys in writes.items():
        if owned.get(attribute) in set(keys):
            raise ValueError(
                f"{tool}(key_added={key_added!r}) would write adata.{attribute}"
                f"[{owned[attribute]!r}], which holds the tokenization that "
                "sgf.pp.rank_tokenize wrote and the tools read. Choose another key_added."
            )


def read_n_tokens(adata: AnnData, key: str = TOKENS_KEY, *, width: int | None = None) -> np.ndarray:
    """``obs[f"{key}_n_tokens"]`` as int64, checked against the token rows' ``width``.

    A missing column, values that are no counts (NaN, negative, fractional) or counts wider
    than the token rows mean the slots were edited or come from different tokenizations;
    each is refused with the slot named, before any cell is read past its row.
    """
    slot = n_tokens_slot(key)
    redo = (
        "Re-run sgf.pp.rank_tokenize(adata, model.vocab), or delete "
        f"adata.obsm[{tokens_slot(key)!r}] and let the tool tokenize."
    )
    if slot not in adata.obs.columns:
        raise KeyError(
            f"adata.obsm[{tokens_slot(key)!r}] is there but adata.obs[{slot!r}] (tokens per "
            f"cell) is missing: the tokenization is incomplete. {redo}"
        )
    values = pd.to_numeric(adata.obs[slot], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if width is not None:
        bad |= values > width
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        cell, value = adata.obs_names[first], adata.obs[slot].iloc[first]
        raise ValueError(
            f"adata.obs[{slot!r}] holds {value} "
            f"for cell {cell!r}: tokens per cell must be whole numbers from 0 to the width of "
            f"adata.obsm[{tokens_slot(key)!r}] ({width}). The two slots do not belong "
            f"together. {redo}"
        )
    return values.astype(np.int64)


def warn_if_tokens_outside_var(
    adata: AnnData, tokens: np.ndarray, special: Iterable[int], key: str = TOKENS_KEY
) -> None:
    """Warn when the token rows hold genes that ``var`` no longer has.

    After ``adata = adata[:, kept_genes]`` the token rows still rank the dropped genes: the
    tools would embed cells with genes the user removed, and no per-gene result could name
    them.
    """
    slot = var_token_slot(key)
    if slot not in adata.var.columns or tokens.size == 0:
        return
    in_var = var_tokens(adata, key)
    size = int(max(tokens.max(), in_var.max(initial=0), *special)) + 1
    used = np.zeros(size, dtype=bool)
    used[tokens.ravel()] = True
    used[list(special)] = False
    used[in_var[in_var >= 0]] = False
    outside = np.flatnonzero(used)
    if len(outside):
        warnings.warn(
            f"adata.obsm[{tokens_slot(key)!r}] holds {len(outside):,} genes that adata.var no "
            f"longer has (token ids e.g. {outside[:3].tolist()}); they were tokenized before "
            "genes were dropped and are still used. Re-run sgf.pp.rank_tokenize(adata, "
            "model.vocab) to rank the cells on the genes kept.",
            UserWarning,
            stacklevel=4,
        )


def var_tokens(adata: AnnData, key: str = TOKENS_KEY) -> np.ndarray:
    """Each ``var`` row's token id as int64 (-1: not in the vocabulary).

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> adata = ad.AnnData(np.zeros((1, 3)), var=pd.DataFrame({"geneformer_token": [7, -1, 5]}))
    >>> var_tokens(adata).tolist()
    [7, -1, 5]
    """
    return adata.var[var_token_slot(key)].to_numpy().astype(np.int64)


def counts_layer(adata: AnnData, key: str = TOKENS_KEY) -> str | None:
    """Return the layer the tokens were made from (None for ``X``), as ``uns[key]`` says."""
    info = adata.uns.get(key, {})
    layer = info.get("layer", "X") if isinstance(info, Mapping) else "X"
    return None if layer in (None, "X") else layer


def positions_of(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``wanted`` first occurs in ``keys``, and whether it occurs at all.

    Returns ``(index, found)``: int64 positions into ``keys`` (0 where not found) and a boolean
    mask, both shaped as ``wanted``.

    Examples
    --------
    >>> index, found = positions_of(np.array([4, 9, 4]), np.array([9, 3, 4]))
    >>> index.tolist(), found.tolist()
    ([1, 0, 0], [True, False, True])
    """
    lookup = pd.Series(np.arange(len(keys)), index=np.asarray(keys))
    lookup = lookup[~lookup.index.duplicated()]
    at = lookup.reindex(np.asarray(wanted)).to_numpy()
    found = ~np.isnan(at)
    return np.where(found, at, 0).astype(np.int64), found


def token_values_to_var(
    var_token: np.ndarray, tokens: np.ndarray, values: np.ndarray, fill: float = np.nan
) -> np.ndarray:
    """Spread values given per token (``values[i]`` for ``tokens[i]``) onto ``var`` rows.

    Rows whose token is not among ``tokens`` (or is -1) get ``fill``.

    Examples
    --------
    >>> token_values_to_var(np.array([5, -1, 8]), np.array([8, 5]), np.array([0.8, 0.5]))
    array([0.5, nan, 0.8])
    """
    at, found = positions_of(tokens, var_token)
    return np.where(found, np.asarray(values)[at], fill)


def table_to_var(var_token: np.ndarray, table: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Rows of a table indexed by token id (vocabulary-sized first axis) for each ``var`` row.

    Examples
    --------
    >>> table_to_var(np.array([2, -1]), np.array([10.0, 11.0, 12.0]))
    array([12., nan])
    """
    table = np.asarray(table)
    known = var_token >= 0
    picked = table[np.maximum(var_token, 0)]
    mask = known.reshape(known.shape + (1,) * (picked.ndim - 1))
    return np.where(mask, picked, fill)
