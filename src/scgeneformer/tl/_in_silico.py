"""``tl.in_silico_delete`` and ``tl.in_silico_overexpress``: which genes move cells toward a goal.

For every start-state cell and every gene in it (or every listed gene), a variant token list
is made (the gene removed, or moved to the front), embedded at the chosen layer next to the
original, and scored by how much closer it comes to the goal state's embedding. All variants
of one cell share one length, so they run as one dense, unpadded batch that stops at the
layer read; cosines are taken on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData

from .._deprecation import renamed_keywords
from .._progress import progress_bar
from .._settings import settings
from .._slots import positions_of, token_values_to_var, var_tokens
from ..model import Geneformer
from ..train._distributed import setup_distributed
from ..train._optim import autocast, resolve_device_dtype
from ._background import rank_matched_background
from ._inference import check_pooling, encode_cells, hidden_layer_index, inference_on
from ._perturb_stats import check_alternative, gene_statistics, null_description
from ._tokens import cell_tokens


@dataclass(frozen=True)
class _Screen:
    """What a screen perturbs and against which state embeddings it scores."""

    mode: str  # "delete" or "overexpress"
    targets: dict[str, torch.Tensor]  # name -> state embedding; empty without states
    listed: np.ndarray | None  # token ids to perturb; None = every gene of each cell


def _state_cells(adata: AnnData, state_key: str, state: str, n_tokens: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero((adata.obs[state_key] == state).to_numpy() & (n_tokens > 0))
    if len(rows) == 0:
        raise ValueError(
            f"The state {state!r} of obs[{state_key!r}] has no cells with tokens; nothing to "
            "embed for it."
        )
    return rows


def _check_states(adata: AnnData, state_key: str | None, states: Sequence[str]) -> None:
    if state_key is None:
        return
    if state_key not in adata.obs.columns:
        raise KeyError(
            f"state_key={state_key!r} is not a column of adata.obs; the columns are "
            f"{list(adata.obs.columns)}."
        )
    present = pd.unique(adata.obs[state_key].astype(str))
    unknown = [s for s in states if s not in set(present)]
    if unknown:
        raise ValueError(
            f"{unknown} not found in obs[{state_key!r}]; the states present are "
            f"{sorted(present.tolist())}."
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


def _deleted(row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One variant per position, that token removed (later tokens shift down by one)."""
    cols = torch.arange(row.numel() - 1, device=row.device)
    return row[cols[None, :] + (cols[None, :] >= positions[:, None]).long()]


def _moved_to_front(row: torch.Tensor, positions: torch.Tensor, lead: int) -> torch.Tensor:
    """One variant per position, that token moved to the front (just after ``<cls>``)."""
    cols = torch.arange(row.numel(), device=row.device)[None, :]
    at = positions[:, None]
    shifted = cols - ((cols > lead) & (cols <= at)).long()
    return row[torch.where(cols == lead, at, shifted)]


def _inserted_in_front(
    row: torch.Tensor, inserts: torch.Tensor, lead: int, trail: int, max_length: int
) -> torch.Tensor:
    """One variant per absent token, put in front; the last gene goes if the cell is full."""
    if row.numel() >= max_length:
        row = torch.cat([row[: row.numel() - 1 - trail], row[row.numel() - trail :]])
    base = row[None, :].expand(inserts.numel(), -1)
    return torch.cat([base[:, :lead], inserts[:, None], base[:, lead:]], dim=1)


def _pool(states: torch.Tensor, lead: int, trail: int, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return states[:, 0]
    return states[:, lead : states.shape[1] - trail].mean(dim=1)


def _run_screen(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    cells: np.ndarray,
    screen: _Screen,
    *,
    layer_index: int,
    pooling: str,
    device: torch.device,
    dtype: torch.dtype,
    token_budget: int,
) -> pd.DataFrame:
    """One row per (cell, perturbed gene): cell, token, position and scores."""
    vocab = model.vocab
    lead = 1 if vocab.has_cls else 0
    trail = lead
    special = torch.tensor(list(vocab.special_tokens.values()), device=device)
    targets = {k: v.to(device) for k, v in screen.targets.items()}
    listed = None if screen.listed is None else torch.as_tensor(screen.listed, device=device)
    columns: dict[str, list[np.ndarray]] = {"cell": [], "token": [], "position": []}
    for name in [*targets, "magnitude"]:
        columns[f"score_{name}"] = []

    def embed(batch: torch.Tensor) -> torch.Tensor:
        parts = []
        per_batch = max(1, token_budget // batch.shape[1])
        for start in range(0, batch.shape[0], per_batch):
            chunk = batch[start : start + per_batch]
            states = model.hidden_states(chunk, layer=layer_index, validate=False)
            parts.append(_pool(states.float(), lead, trail, pooling))
        return torch.cat(parts)

    bar = progress_bar(total=len(cells), desc=f"in silico {screen.mode}", unit="cells")
    no_tokens = torch.empty(0, dtype=torch.long, device=device)
    with inference_on(model, device), autocast(device, dtype), bar:
        for c in cells:
            row = torch.as_tensor(tokens[c, : n_tokens[c]].astype(np.int64), device=device)
            is_gene = ~torch.isin(row, special)
            wanted = is_gene if listed is None else is_gene & torch.isin(row, listed)
            positions = torch.nonzero(wanted).flatten()
            inserts = no_tokens
            if screen.mode == "delete":
                variant_sets = [_deleted(row, positions)]
            else:
                variant_sets = [_moved_to_front(row, positions, lead)]
                if listed is not None:
                    inserts = listed[~torch.isin(listed, row)]
                    variant_sets.append(
                        _inserted_in_front(row, inserts, lead, trail, model.max_length)
                    )
            variant_sets = [v for v in variant_sets if v.shape[0]]
            bar.update(1)
            if not variant_sets:
                continue
            original = embed(row[None, :])
            pooled = torch.cat([embed(v) for v in variant_sets])
            columns["cell"].append(np.full(len(pooled), c))
            columns["token"].append(torch.cat([row[positions], inserts]).cpu().numpy())
            where = torch.cat([positions, torch.full_like(inserts, -1)])
            columns["position"].append(where.cpu().numpy())
            for name, target in targets.items():
                shift = F.cosine_similarity(pooled, target[None, :]) - F.cosine_similarity(
                    original, target[None, :]
                )
                columns[f"score_{name}"].append(shift.cpu().numpy())
            magnitude = 1 - F.cosine_similarity(pooled, original)
            columns["score_magnitude"].append(magnitude.cpu().numpy())
    return pd.DataFrame({k: np.concatenate(v) if v else np.empty(0) for k, v in columns.items()})


def _remove_tokens(tokens: np.ndarray, n_tokens: np.ndarray, drop: np.ndarray):
    """Token rows with every token in ``drop`` removed, left-compacted; and their lengths."""
    width = tokens.shape[1]
    valid = np.arange(width)[None, :] < n_tokens[:, None]
    keep = valid & ~np.isin(tokens, drop)
    order = np.argsort(~keep, axis=1, kind="stable")
    out = np.where(
        np.arange(width)[None, :] < keep.sum(1)[:, None], np.take_along_axis(tokens, order, 1), 0
    )
    return out.astype(tokens.dtype), keep.sum(1)


def _screen(
    adata: AnnData,
    model: Geneformer,
    *,
    mode: str,
    state_key: str | None,
    start_state: str | None,
    goal_state: str | None,
    alt_states: Sequence[str],
    genes: str | Sequence[str],
    combine: bool,
    max_cells: int | None,
    emb_layer: int,
    pooling: str,
    min_cells: int,
    alternative: str,
    n_background: int,
    key_added: str,
    store_per_cell: bool,
    token_budget: int | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    random_state: int,
    copy: bool,
) -> AnnData | None:
    layer_index = hidden_layer_index(model, emb_layer)
    check_pooling(model, pooling)
    alt_states = [str(a) for a in alt_states]
    if state_key is None:
        if start_state is not None or goal_state is not None or alt_states:
            raise ValueError("start_state, goal_state and alt_states need state_key.")
    elif start_state is None or goal_state is None:
        raise ValueError("With state_key, give both start_state and goal_state.")
    _check_states(adata, state_key, [s for s in (start_state, goal_state, *alt_states) if s])
    listed = _listed_tokens(model, genes)
    if combine and listed is None:
        raise ValueError("combine=True perturbs a listed set of genes together; pass genes=[...].")
    if combine and mode != "delete":
        raise ValueError("combine=True is supported for deletion only.")
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}.")
    check_alternative(alternative)

    target = adata.copy() if copy else adata
    device_, dtype_ = resolve_device_dtype(device, dtype)
    # Under torchrun each process screens its own share of the cells; all get every result.
    ctx = setup_distributed(device_)
    device_ = ctx.device
    tokens, n_tokens = cell_tokens(target, model)
    budget = token_budget or settings.token_budget
    if state_key is None:
        start = np.flatnonzero(n_tokens > 0)
        if len(start) == 0:
            raise ValueError("No cell has tokens; nothing to perturb.")
    else:
        start = _state_cells(target, state_key, start_state, n_tokens)
    n_start_total = len(start)
    if max_cells is not None and len(start) > max_cells:
        rng = np.random.default_rng(random_state)
        start = np.sort(rng.choice(start, size=int(max_cells), replace=False))
    skipped = int(((n_tokens == 0) & _in_state(target, state_key, start_state)).sum())
    if skipped:
        warnings.warn(
            f"{skipped} start cells have no tokens and are skipped.", UserWarning, stacklevel=3
        )

    def state_embedding(state: str) -> torch.Tensor:
        rows = _state_cells(target, state_key, state, n_tokens)
        pooled = encode_cells(
            model,
            tokens[rows],
            n_tokens[rows],
            emb_layer=emb_layer,
            pooling=pooling,
            device=device_,
            dtype=dtype_,
            token_budget=budget,
            desc=f"state {state}",
        ).cells
        return torch.as_tensor(pooled.astype(np.float64).mean(axis=0), dtype=torch.float32)

    targets = {}
    if state_key is not None:
        targets["goal"] = state_embedding(goal_state)
        for alt in alt_states:
            targets[alt] = state_embedding(alt)
    params = {
        "mode": mode,
        "state_key": state_key or "",
        "start_state": "" if start_state is None else str(start_state),
        "goal_state": "" if goal_state is None else str(goal_state),
        "alt_states": list(alt_states),
        "genes": "all" if listed is None else [str(g) for g in model.vocab.gene_by_token[listed]],
        "emb_layer": int(emb_layer),
        "pooling": pooling,
        "min_cells": int(min_cells),
        "n_start_cells": len(start),
        "n_start_cells_total": int(n_start_total),
        "score": "cos(variant, goal) - cos(original, goal)"
        if targets
        else "1 - cos(variant, original)",
        "alternative": alternative,
        "model_preset": model.preset or "custom",
        "vocabulary_sha256": model.vocab.sha256,
        "random_state": int(random_state),
    }
    if combine:
        _combined(
            target,
            model,
            tokens,
            n_tokens,
            start,
            listed,
            targets,
            key_added,
            params,
            emb_layer=emb_layer,
            pooling=pooling,
            device=device_,
            dtype=dtype_,
            budget=budget,
        )
        return target if copy else None

    background = np.empty(0, dtype=np.int64)
    if listed is not None:
        special = np.asarray(list(model.vocab.special_tokens.values()))
        background = rank_matched_background(
            tokens,
            n_tokens,
            start,
            listed,
            n_background,
            special=special,
            min_cells=min_cells,
            random_state=random_state,
        )
        params["background_genes"] = [str(g) for g in model.vocab.gene_by_token[background]]
    # Without background genes (none asked for, or none expressed) the genes face each other.
    null_tokens = background if len(background) else None
    params["null"] = null_description(null_tokens is not None)
    screen = _Screen(mode, targets, None if listed is None else np.union1d(listed, background))
    try:
        table = _run_screen(
            model,
            tokens,
            n_tokens,
            start[ctx.rank :: ctx.world_size],
            screen,
            layer_index=layer_index,
            pooling=pooling,
            device=device_,
            dtype=dtype_,
            token_budget=budget,
        )
        table = pd.concat(ctx.gather(table), ignore_index=True)
    finally:
        ctx.close()
    params["n_processes"] = ctx.world_size
    main = "score_goal" if targets else "score_magnitude"
    result = gene_statistics(
        table["cell"].to_numpy(),
        table["token"].to_numpy(),
        table["position"].to_numpy(),
        table[main].to_numpy(),
        min_cells=min_cells,
        alternative=alternative,
        null_tokens=null_tokens,
    )
    var_token = var_tokens(target)
    # With a gene list only the listed genes are reported; the background was their null.
    reported = slice(None) if listed is None else np.isin(result.token, listed)

    def per_var(values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        return token_values_to_var(var_token, result.token[reported], values[reported], fill)

    target.var[f"{key_added}_shift"] = per_var(result.shift)
    target.var[f"{key_added}_zscore"] = per_var(result.zscore)
    target.var[f"{key_added}_pval"] = per_var(result.pval)
    target.var[f"{key_added}_fdr"] = per_var(result.fdr)
    target.var[f"{key_added}_n_cells"] = per_var(result.n_cells, 0).astype(np.int64)
    target.var[f"{key_added}_ci_low"] = per_var(result.ci_low)
    target.var[f"{key_added}_ci_high"] = per_var(result.ci_high)
    target.var[f"{key_added}_frac_toward"] = per_var(result.frac_toward)
    for alt in alt_states:
        alt_shift = table.groupby("token")[f"score_{alt}"].mean().reindex(result.token).to_numpy()
        target.var[f"{key_added}_shift_{alt}"] = per_var(alt_shift)
    if store_per_cell:
        target.layers[key_added] = _per_cell_layer(target, table, main, var_token)
    params["n_genes_tested"] = int(np.isfinite(result.fdr).sum())
    params["n_null_genes"] = int(result.n_null.max(initial=0))
    params["n_perturbations"] = len(table)
    target.uns[key_added] = params
    return target if copy else None


def _in_state(adata: AnnData, state_key: str | None, state: str | None) -> np.ndarray:
    if state_key is None:
        return np.ones(adata.n_obs, dtype=bool)
    return (adata.obs[state_key] == state).to_numpy()


def _per_cell_layer(
    adata: AnnData, table: pd.DataFrame, score: str, var_token: np.ndarray
) -> sp.csr_matrix:
    """Sparse cells x genes matrix of shifts, at each token's first column in var."""
    cols, ok = positions_of(var_token, table["token"].to_numpy())
    return sp.csr_matrix(
        (table[score].to_numpy()[ok], (table["cell"].to_numpy()[ok], cols[ok])),
        shape=adata.shape,
    )


def _combined(
    adata,
    model,
    tokens,
    n_tokens,
    start,
    listed,
    targets,
    key_added,
    params,
    *,
    emb_layer,
    pooling,
    device,
    dtype,
    budget,
) -> None:
    """Delete all listed genes together from each start cell; per-cell shifts into obs."""
    variant, n_variant = _remove_tokens(tokens[start], n_tokens[start], listed)
    args = dict(
        emb_layer=emb_layer, pooling=pooling, device=device, dtype=dtype, token_budget=budget
    )
    original = torch.as_tensor(encode_cells(model, tokens[start], n_tokens[start], **args).cells)
    changed = torch.as_tensor(encode_cells(model, variant, n_variant, **args).cells)
    if targets:
        goal = targets["goal"][None, :]
        shift = F.cosine_similarity(changed, goal) - F.cosine_similarity(original, goal)
    else:
        shift = 1 - F.cosine_similarity(changed, original)
    column = np.full(adata.n_obs, np.nan)
    column[start] = shift.numpy()
    adata.obs[f"{key_added}_combined_shift"] = column
    params["combined"] = True
    params["combined_mean_shift"] = float(np.nanmean(column))
    adata.uns[key_added] = params


_SHARED_PARAMETERS = """
    Parameters
    ----------
    adata
        Cells; tokens in ``obsm["geneformer_tokens"]`` or raw counts to make them from.
    model
        A pretrained (or fine-tuned) :class:`~scgeneformer.Geneformer`.
    state_key
        Column of ``obs`` with cell states; without it the score is the magnitude
        ``1 - cos(variant, original)``.
    start_state
        The state whose cells are perturbed (e.g. the disease state).
    goal_state
        The state to move toward (e.g. healthy); its embedding is the exact mean of its
        cells' embeddings.
    alt_states
        Other states to report shifts toward (``var[f"{key_added}_shift_{state}"]``).
    genes
        ``"all"`` (every gene of each cell) or a list of genes (vocabulary IDs or mapped
        symbols).
    max_cells
        Perturb at most this many start cells (a random subset by ``random_state``).
    emb_layer, pooling
        As in :func:`~scgeneformer.tl.embed` (``layer=``, the old name of ``emb_layer``,
        still works with a warning until version 0.3).
    min_cells
        Genes perturbed in fewer cells get no p-value.
    alternative
        The hypothesis each p-value tests: ``"greater"`` (the default) that perturbing the gene
        moves cells toward the goal state more than perturbing a null gene at the same rank
        does (without states: that it changes the embedding more); ``"less"``, away from the
        goal; ``"two-sided"``, either way.
    n_background
        With a gene list, also perturb this many random genes expressed in the same cells,
        each drawn near a listed gene in mean rank and number of cells
        (:func:`~scgeneformer.tl._background.rank_matched_background`), and test the listed
        genes against them; they are recorded in ``uns[key_added]["background_genes"]``,
        not in ``var``. ``0`` tests the listed genes against each other. Ignored with
        ``genes="all"``, where every other gene is the null.
    key_added
        Prefix of the result slots.
    store_per_cell
        Also write the per-cell shifts as a sparse ``layers[key_added]`` (background genes
        included; :func:`~scgeneformer.tl.perturbation_stats` reads it).
    token_budget, device, dtype
        As in :func:`~scgeneformer.tl.embed` (``batch_tokens=`` is the old name of
        ``token_budget``).
    random_state
        Seed for the ``max_cells`` subset.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    None, or a new AnnData with ``copy=True``. Writes, per gene,
    ``var[f"{key_added}_shift"]`` (mean shift toward the goal over the cells where it was
    perturbed), ``_ci_low`` and ``_ci_high`` (its 95% t-interval across those cells),
    ``_frac_toward`` (the share of them the perturbation moved toward the goal; without
    states, the share it changed at all), ``_zscore`` (the rank-adjusted statistic, the one
    to rank by), ``_pval`` and ``_fdr`` (see Notes), ``_n_cells``, and ``_shift_{state}`` per
    alt state; the parameters, the test direction, the null and the background genes in
    ``uns[key_added]``.

    Notes
    -----
    The per-cell score is ``cos(variant, goal) - cos(original, goal)``: positive when the
    perturbation moves the cell toward the goal. Deleting a highly ranked gene moves any cell
    more, so each score is compared with the other genes perturbed at nearby rank positions
    in the same cell; a gene's z-score is the mean of these residuals over its cells, scaled
    by their pooled spread.

    A p-value says how unusual the gene's z-score is among the null genes' (the other genes
    of the screen, or the background with a gene list), in the direction ``alternative``
    names: the null is the null genes' median and spread (MAD), with a Student t tail for
    ``m`` null genes (Efron's empirical null); and it is never smaller than the smallest
    p-value a sign test across the gene's ``n`` cells could give, ``2**-n`` (``2**(1 - n)``
    two-sided): 15 cells cannot give less than 3e-5, whatever the z-score. With fewer than
    three null genes every p-value is 1. FDR is Benjamini-Hochberg over the genes tested. A small
    FDR says that a gene stands out from the other genes of this screen, in this model; it is
    a ranking to follow up, not proof of causation, and not a test that the state difference
    is real (see the docs page "Reading a screen").
"""


@renamed_keywords(layer="emb_layer", batch_tokens="token_budget")
def in_silico_delete(
    adata: AnnData,
    model: Geneformer,
    *,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    alt_states: Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    combine: bool = False,
    max_cells: int | None = None,
    emb_layer: int = -1,
    pooling: str = "mean",
    min_cells: int = 3,
    alternative: str = "greater",
    n_background: int = 200,
    key_added: str = "in_silico_delete",
    store_per_cell: bool = False,
    token_budget: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Delete each gene from start-state cells and rank genes by the shift toward the goal.

    For every start cell and every gene in it (or every listed gene), the variant is the
    cell's token list without that gene (later genes move up one place). Original and variants
    are embedded at ``emb_layer``; the variants of one cell share one length and run as one dense
    batch. With ``combine=True`` the listed genes are deleted together, one variant per cell,
    and the per-cell shifts go to ``obs[f"{key_added}_combined_shift"]``.
    {parameters}

    Examples
    --------
    >>> sgf.tl.in_silico_delete(
    ...     adata, model, state_key="condition", start_state="stim", goal_state="ctrl"
    ... )  # doctest: +SKIP
    >>> adata.var.sort_values("in_silico_delete_shift", ascending=False).head()  # doctest: +SKIP
    """
    return _screen(
        adata,
        model,
        mode="delete",
        state_key=state_key,
        start_state=start_state,
        goal_state=goal_state,
        alt_states=alt_states,
        genes=genes,
        combine=combine,
        max_cells=max_cells,
        emb_layer=emb_layer,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_background=n_background,
        key_added=key_added,
        store_per_cell=store_per_cell,
        token_budget=token_budget,
        device=device,
        dtype=dtype,
        random_state=random_state,
        copy=copy,
    )


@renamed_keywords(layer="emb_layer", batch_tokens="token_budget")
def in_silico_overexpress(
    adata: AnnData,
    model: Geneformer,
    *,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    alt_states: Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    max_cells: int | None = None,
    emb_layer: int = -1,
    pooling: str = "mean",
    min_cells: int = 3,
    alternative: str = "greater",
    n_background: int = 200,
    key_added: str = "in_silico_overexpress",
    store_per_cell: bool = False,
    token_budget: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Move each gene to the front of start-state cells and rank genes by the shift.

    As Geneformer's overexpression: the gene moves to the top of the cell's ranking (just
    after ``<cls>``); a listed gene the cell lacks is inserted there, and a cell already at
    the maximum length drops its last gene to make room.
    {parameters}

    Examples
    --------
    >>> sgf.tl.in_silico_overexpress(
    ...     adata, model, state_key="state", start_state="disease", goal_state="healthy"
    ... )  # doctest: +SKIP
    """
    return _screen(
        adata,
        model,
        mode="overexpress",
        state_key=state_key,
        start_state=start_state,
        goal_state=goal_state,
        alt_states=alt_states,
        genes=genes,
        combine=False,
        max_cells=max_cells,
        emb_layer=emb_layer,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_background=n_background,
        key_added=key_added,
        store_per_cell=store_per_cell,
        token_budget=token_budget,
        device=device,
        dtype=dtype,
        random_state=random_state,
        copy=copy,
    )


for _function in (in_silico_delete, in_silico_overexpress):
    _function.__doc__ = _function.__doc__.replace("{parameters}", _SHARED_PARAMETERS)
