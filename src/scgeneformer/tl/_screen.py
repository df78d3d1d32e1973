"""What a screen is asked: its arguments checked and normalised, and the cells' states.

:func:`check_request` turns the keyword arguments of ``tl.in_silico_delete`` /
``tl.in_silico_overexpress`` into a :class:`ScreenRequest`, refusing bad input before any
work; states are compared in one text form everywhere (:func:`state_label`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._slots import check_key_added
from ..data._batching import check_token_budget
from ..model import Geneformer, GeneformerClassifier
from ._anchor import anchor_token
from ._inference import check_pooling, hidden_layer_index
from ._model_arg import encoder_of, warn_if_not_finetuned_on
from ._perturb_stats import check_alternative
from ._variants import DEFAULT_N_EXACT, METHODS

_VAR_SUFFIXES = (
    "shift",
    "zscore",
    "pval",
    "fdr",
    "n_cells",
    "ci_low",
    "ci_high",
    "frac_toward",
    "estimate",
    "n_cells_estimate",
    "anchor_combined",
    "anchor_interaction",
    "anchor_n_cells",
)


@dataclass(frozen=True)
class ScreenRequest:
    """A screen's arguments after checking: states as labels, genes as token ids."""

    mode: str  # "delete" or "overexpress"
    state_key: str | None
    start_state: str | None
    goal_state: str | None
    alt_states: list[str]
    listed: np.ndarray | None  # token ids of genes=[...]; None = every gene
    combine: bool
    method: str
    n_exact: int
    n_background: int
    gene_shifts: bool
    anchor_gene: str | None
    anchor: int | None  # the anchor gene's token id
    max_cells: int | None
    emb_layer: int
    layer_index: int  # emb_layer as an index into the model's hidden states
    pooling: str
    min_cells: int
    alternative: str
    n_null_genes: int
    key_added: str
    store_per_cell: bool
    token_budget: int | None
    device: str | torch.device | None
    dtype: str | torch.dtype | None
    random_state: int
    copy: bool


def screen_slots(key: str) -> dict[str, list[str]]:
    """Return the slots a screen writes under ``key`` (per-state columns aside)."""
    return {
        "var": [f"{key}_{suffix}" for suffix in _VAR_SUFFIXES],
        "obs": [f"{key}_combined_shift"],
        "layers": [key, f"{key}_estimate"],
        "varp": [f"{key}_gene_shift", f"{key}_gene_shift_n_cells"],
        "uns": [key],
    }


def check_request(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    mode: str,
    state_key: str | None,
    start_state: str | None,
    goal_state: str | None,
    alt_states: Sequence[str],
    genes: str | Sequence[str],
    combine: bool,
    method: str,
    n_exact: int | None,
    n_background: int | None,
    gene_shifts: bool,
    anchor_gene: str | None,
    emb_layer: int,
    pooling: str,
    min_cells: int,
    alternative: str,
    n_null_genes: int,
    key_added: str,
    max_cells: int | None,
    token_budget: int | None,
    **rest,
) -> ScreenRequest:
    """Check a screen's arguments against ``adata`` and ``model``; nothing is changed.

    ``rest`` (cells, batching, device, seed, copy) passes through unchecked here.
    """
    given, model = model, encoder_of(model)
    check_key_added(key_added, screen_slots(key_added), tool=f"tl.in_silico_{mode}")
    layer_index = hidden_layer_index(model, emb_layer)
    check_pooling(model, pooling)
    start_state, goal_state, alt_states = _check_state_arguments(
        adata, state_key, start_state, goal_state, alt_states
    )
    if state_key is not None:
        warn_if_not_finetuned_on(given, state_key, [start_state, goal_state])
    listed = _listed_tokens(model, genes)
    if combine and listed is None:
        raise ValueError("combine=True perturbs a listed set of genes together; pass genes=[...].")
    if combine and mode != "delete":
        raise ValueError("combine=True is supported for deletion only.")
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}.")
    if max_cells is not None and (
        isinstance(max_cells, bool) or not isinstance(max_cells, int | np.integer) or max_cells < 1
    ):
        raise ValueError(
            f"max_cells must be a whole number of at least 1, or None for every start cell; "
            f"got {max_cells!r}."
        )
    check_token_budget(token_budget)
    n_exact, n_background = _check_method(mode, method, n_exact, n_background, combine)
    anchor = None
    if anchor_gene is not None:
        if method == "first_order" or mode != "delete" or combine:
            raise ValueError(
                "anchor_gene combines exact single deletions with the anchor: it needs "
                f"method='exact' or 'two_stage' (got mode={mode!r}, method={method!r}, "
                f"combine={combine})."
            )
        anchor = anchor_token(model, anchor_gene)
    if gene_shifts and (method == "first_order" or mode != "delete" or combine):
        raise ValueError(
            "gene_shifts=True compares each gene's own state in exactly deleted variants: it "
            f"needs single deletions with method='exact' or 'two_stage' (got mode={mode!r}, "
            f"method={method!r}, combine={combine})."
        )
    check_alternative(alternative)
    if isinstance(n_null_genes, bool) or not isinstance(n_null_genes, int | np.integer):
        raise TypeError(f"n_null_genes must be an integer, got {n_null_genes!r}.")
    if n_null_genes < 0:
        raise ValueError(f"n_null_genes must be at least 0, got {n_null_genes}.")
    return ScreenRequest(
        mode=mode,
        state_key=state_key,
        start_state=start_state,
        goal_state=goal_state,
        alt_states=alt_states,
        listed=listed,
        combine=combine,
        method=method,
        n_exact=n_exact,
        n_background=n_background,
        gene_shifts=gene_shifts,
        anchor_gene=anchor_gene,
        anchor=anchor,
        emb_layer=emb_layer,
        layer_index=layer_index,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_null_genes=int(n_null_genes),
        key_added=key_added,
        max_cells=max_cells,
        token_budget=token_budget,
        **rest,
    )


def _check_state_arguments(
    adata: AnnData,
    state_key: str | None,
    start_state: object,
    goal_state: object,
    alt_states: Sequence[str] | str,
) -> tuple[str | None, str | None, list[str]]:
    """Start, goal and alt states as labels, each checked to be present and distinct."""
    if isinstance(alt_states, str):  # one state, not its characters
        alt_states = [alt_states]
    alt_states = [state_label(a) for a in alt_states]
    if state_key is None:
        if start_state is not None or goal_state is not None or alt_states:
            raise ValueError("start_state, goal_state and alt_states need state_key.")
    elif start_state is None or goal_state is None:
        raise ValueError("With state_key, give both start_state and goal_state.")
    else:
        start_state, goal_state = state_label(start_state), state_label(goal_state)
        _check_states(adata, state_key, [start_state, goal_state, *alt_states])
    return start_state, goal_state, alt_states


def state_label(value: object) -> str:
    """Return the text form states are compared in (``1``, ``1.0``, ``"1"`` all read ``"1"``).

    A state column may hold strings, integers, booleans or a categorical of any of them, and a
    user names a state as they like; both sides pass through this function.

    Examples
    --------
    >>> [state_label(v) for v in (1, "1", 1.0, np.int64(1), True, "disease")]
    ['1', '1', '1', '1', 'True', 'disease']
    """
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def state_labels(adata: AnnData, state_key: str) -> np.ndarray:
    """Each cell's state in :func:`state_label` form (labelled once per distinct value)."""
    codes, uniques = pd.factorize(adata.obs[state_key], use_na_sentinel=True)
    names = np.array([state_label(u) for u in uniques] + ["nan"], dtype=object)
    return names[codes]  # the sentinel -1 picks "nan"


def state_cells(adata: AnnData, state_key: str, state: str, n_tokens: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero((state_labels(adata, state_key) == state) & (n_tokens > 0))
    if len(rows) == 0:
        raise ValueError(
            f"The state {state!r} of obs[{state_key!r}] has no cells with tokens; nothing to "
            "embed for it."
        )
    return rows


def _check_states(adata: AnnData, state_key: str | None, states: Sequence[str]) -> None:
    """Refuse a missing column, states absent from it, and states named twice.

    ``states`` are start, goal and alt states, already in :func:`state_label` form.
    """
    if state_key is None:
        return
    if state_key not in adata.obs.columns:
        raise KeyError(
            f"state_key={state_key!r} is not a column of adata.obs; the columns are "
            f"{list(adata.obs.columns)}."
        )
    start, goal, *alts = states
    if len(set(alts)) < len(alts) or set(alts) & {start, goal}:
        raise ValueError(
            f"alt_states={alts} must be states other than start_state={start!r} and "
            f"goal_state={goal!r}, each named once: a shift toward a state already scored, or "
            "toward the cells' own state, says nothing new."
        )
    if start == goal:
        # Not refused: the same deletions in goal cells are the null screen that
        # perturbation_stats(mode="vs_null") compares a screen with.
        warnings.warn(
            f"start_state and goal_state are both {start!r}: the cells already are in the goal "
            "state, so each shift measures how far a deletion moves them out of it. That is a "
            'null screen (for sgf.tl.perturbation_stats(mode="vs_null")), not a screen toward '
            "a goal; pass another goal_state for that.",
            UserWarning,
            stacklevel=6,  # the public tool (through check_request and screen)
        )
    present = set(state_labels(adata, state_key))
    unknown = [s for s in states if s not in present]
    if unknown:
        raise ValueError(
            f"{unknown} not found in obs[{state_key!r}]; the states present are {sorted(present)}."
        )


def _listed_tokens(model: Geneformer, genes: str | Sequence[str]) -> np.ndarray | None:
    """Token ids of the listed genes (vocabulary IDs, any Ensembl version, mapped symbols)."""
    if isinstance(genes, str):
        if genes != "all":
            raise ValueError(f"genes must be 'all' or a list of genes, got {genes!r}.")
        return None
    names = [str(g) for g in genes]
    if not names:
        raise ValueError("genes is an empty list; pass genes='all' or some genes.")
    found = model.vocab.tokens_for(names)
    missing = [n for n, t in zip(names, found, strict=True) if t < 0]
    if missing:
        raise ValueError(
            f"{len(missing)} listed genes are not in the vocabulary {model.vocab.name!r}: "
            f"{missing[:10]}. Use its gene IDs (e.g. {model.vocab.genes[:2]}) or symbols its "
            "mapping knows."
        )
    return np.unique(found)


def warn_if_listed_outside_var(model: Geneformer, listed: np.ndarray, var_token: np.ndarray):
    """Warn about listed genes the vocabulary knows but ``adata.var`` lacks: no cell has them."""
    absent = listed[~np.isin(listed, var_token)]
    if len(absent):
        names = [str(g) for g in model.vocab.gene_by_token[absent[:5]]]
        warnings.warn(
            f"{len(absent)} of the {len(listed)} listed genes are not among adata.var's genes "
            f"(e.g. {names}); no cell expresses them, so they get no result. Check the gene "
            "list against adata.var_names (or the gene_key column the cells were tokenized by).",
            UserWarning,
            stacklevel=4,  # the public tool (through screen and its process-group wrapper)
        )


def in_state(adata: AnnData, state_key: str | None, state: str | None) -> np.ndarray:
    if state_key is None:
        return np.ones(adata.n_obs, dtype=bool)
    return state_labels(adata, state_key) == state


def _check_method(
    mode: str, method: str, n_exact: int | None, n_background: int | None, combine: bool
) -> tuple[int, int]:
    """Refuse unknown methods and bad sizes; the two-stage sizes with their defaults."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method != "exact" and mode != "delete":
        raise ValueError(
            f"method={method!r} is for deletion only: moving a gene to the front changes "
            "every position after <cls>, which no token gate can express. Use method='exact'."
        )
    if method != "exact" and combine:
        raise ValueError(
            f"combine=True deletes one set per cell; use method='exact', not {method!r}."
        )
    for name, value in (("n_exact", n_exact), ("n_background", n_background)):
        if value is None:
            continue
        if method != "two_stage":
            raise ValueError(f"{name} applies to method='two_stage', not method={method!r}.")
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an integer, got {value!r}.")
        if value < (1 if name == "n_exact" else 0):
            raise ValueError(
                f"{name} must be at least {1 if name == 'n_exact' else 0}, got {value}."
            )
    n_exact = DEFAULT_N_EXACT if n_exact is None else int(n_exact)
    n_background = n_exact // 4 if n_background is None else int(n_background)
    return n_exact, n_background
