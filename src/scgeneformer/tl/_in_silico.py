"""``tl.in_silico_delete`` and ``tl.in_silico_overexpress``: which genes move cells toward a goal.

For every start-state cell and every gene in it (or every listed gene), a variant token list
is made (the gene removed, or moved to the front), embedded at the chosen layer next to the
original, and scored by how much closer it comes to the goal state's embedding. All variants
of one cell share one length, so they run as one dense, unpadded batch that stops at the
layer read; cosines are taken on the device.

``method="first_order"`` replaces the variants by one forward and one backward pass per cell
(see ``_first_order``); ``"two_stage"`` then deletes exactly each cell's leading candidates
and a rank-matched background of its other genes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData

from .._deprecation import renamed_keywords
from .._plan import ExecutionPlan, execution_plan
from .._progress import progress_bar
from .._settings import settings
from .._slots import positions_of, token_values_to_var, var_tokens
from ..model import Geneformer, GeneformerClassifier
from ..train._distributed import setup_distributed
from ._anchor import anchor_token, anchor_variants, check_anchor_present
from ._background import rank_matched_background
from ._compiled import EncoderRunner
from ._cost import warn_if_slow_on_cpu
from ._downstream import GeneShifts, write_gene_shifts
from ._first_order import (
    MAGNITUDE_PROJECTIONS,
    ExactProbe,
    choose_candidates,
    gate_estimates,
    rank_matched_positions,
)
from ._inference import check_pooling, encode_cells, hidden_layer_index, inference_on
from ._model_arg import encoder_of, warn_if_not_finetuned_on
from ._perturb_stats import check_alternative, gene_statistics, null_description
from ._tokens import cell_tokens

METHODS = ("exact", "first_order", "two_stage")
# The smallest n_exact of the bench's sweep (10, 16, 24, 32, 48, 64) whose two-round
# candidates held at least 95% of each cell's exact top 10 on both data sets at 256 tokens
# (bench/bench_in_silico.py --methods, bench/RESULTS.md): 32 held 0.91 (synthetic_states)
# and 0.91 (Kang 2018), 48 held 0.96 and 0.96.
DEFAULT_N_EXACT = 48


@dataclass(frozen=True)
class _Screen:
    """What a screen perturbs and against which state embeddings it scores."""

    mode: str  # "delete" or "overexpress"
    targets: dict[str, torch.Tensor]  # name -> state embedding; empty without states
    listed: np.ndarray | None  # token ids to perturb; None = every gene of each cell
    method: str = "exact"
    n_exact: int = DEFAULT_N_EXACT  # candidates per cell deleted exactly ("two_stage")
    n_background: int = DEFAULT_N_EXACT // 4  # rank-matched null genes per cell ("two_stage")
    random_state: int = 0
    gene_shifts: bool = False  # also each deletion's shift of every other gene's own state
    anchor: int | None = None  # token deleted together with each exactly deleted gene

    def exact_positions(
        self,
        c: int,
        positions: torch.Tensor,
        estimate: torch.Tensor,
        probe: ExactProbe | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``positions`` to delete exactly, and which of those form the baseline.

        ``probe`` scores exact deletions while the candidates are chosen (see
        :func:`choose_candidates`).
        """
        everything = torch.ones(positions.numel(), dtype=torch.bool)
        if self.method == "exact":
            return everything, everything
        if self.method == "first_order":
            return ~everything, everything
        if positions.numel() <= self.n_exact:
            return everything, everything
        candidates = choose_candidates(estimate, positions, self.n_exact, probe)
        rng = np.random.default_rng([self.random_state, int(c)])
        others = rank_matched_positions(
            np.arange(positions.numel()), candidates, self.n_background, rng
        )
        exact = torch.zeros_like(everything)
        exact[candidates] = True
        background = torch.zeros_like(everything)
        background[others] = True
        return exact | background, background


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
    plan: ExecutionPlan,
    token_budget: int,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One row per (cell, perturbed gene): cell, token, position, scores, estimates.

    With ``screen.gene_shifts`` also the (deleted, affected) downstream pairs, else None.
    """
    vocab = model.vocab
    device = plan.device
    run = EncoderRunner(model, plan)
    lead = 1 if vocab.has_cls else 0
    trail = lead
    special = torch.tensor(list(vocab.special_tokens.values()), device=device)
    targets = {k: v.to(device) for k, v in screen.targets.items()}
    listed = None if screen.listed is None else torch.as_tensor(screen.listed, device=device)
    columns: dict[str, list[np.ndarray]] = {
        "cell": [],
        "token": [],
        "position": [],
        "exact": [],
        "baseline": [],
    }
    for name in [*targets, "magnitude"]:
        columns[f"score_{name}"] = []
    estimated = list(targets) or ["magnitude"]
    if screen.anchor is not None:
        columns["anchor_combined"], columns["anchor_alone"] = [], []
    if screen.method != "exact":
        for name in estimated:
            columns[f"estimate_{name}"] = []

    def embed(batch: torch.Tensor, on_states=None) -> torch.Tensor:
        parts = []
        per_batch = max(1, token_budget // batch.shape[1])
        for start in range(0, batch.shape[0], per_batch):
            chunk = batch[start : start + per_batch]
            states = run.padded(chunk, None, layer=layer_index, validate=False).float()
            if on_states is not None:
                on_states(start, states)
            parts.append(_pool(states, lead, trail, pooling))
        return torch.cat(parts)

    bar = progress_bar(total=len(cells), desc=f"in silico {screen.mode}", unit="cells")
    shifts = GeneShifts(len(vocab)) if screen.gene_shifts else None

    def first_order(chunk: np.ndarray) -> dict[int, dict[str, torch.Tensor]]:
        """Estimates for a chunk of cells, from one padded forward and backward pass."""
        rows = [
            torch.as_tensor(tokens[c, : n_tokens[c]].astype(np.int64), device=device) for c in chunk
        ]
        seeds = [int(screen.random_state) * 1_000_003 + int(c) for c in chunk]
        kwargs = dict(layer_index=layer_index, lead=lead, trail=trail, pooling=pooling)
        found = gate_estimates(model, rows, targets, seeds=seeds, **kwargs)
        return dict(zip(chunk.tolist(), found, strict=True))

    def probe_deletions(row, positions, is_gene, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled exact deletions at ``index`` of ``positions`` and their estimated score."""
        states = model.hidden_states(row[None, :], layer=layer_index, validate=False).float()
        deleted = positions[torch.as_tensor(index, device=device)]
        hook = None if shifts is None else partial(shifts.add, row, states[0], deleted, is_gene)
        pooled = embed(_deleted(row, deleted), hook)
        original = _pool(states, lead, trail, pooling)
        return pooled, _score(pooled, original, targets.get(estimated[0]))

    copies = 1 if targets else MAGNITUDE_PROJECTIONS
    # Consecutive cells share a gradient pass; the cell loop computes the next chunk's
    # estimates when it reaches a cell without them.
    chunks = iter(_gradient_chunks(cells, n_tokens, token_budget, copies))
    estimates: dict[int, dict[str, torch.Tensor]] = {}
    no_tokens = torch.empty(0, dtype=torch.long, device=device)
    with inference_on(model, plan), bar:
        for c in cells:
            if screen.method != "exact" and c not in estimates:
                estimates = first_order(next(chunks))
            row = torch.as_tensor(tokens[c, : n_tokens[c]].astype(np.int64), device=device)
            is_gene = ~torch.isin(row, special)
            wanted = is_gene if listed is None else is_gene & torch.isin(row, listed)
            positions = torch.nonzero(wanted).flatten()
            inserts = no_tokens
            if screen.mode == "overexpress" and listed is not None:
                inserts = listed[~torch.isin(listed, row)]
            bar.update(1)
            n_rows = positions.numel() + inserts.numel()
            if n_rows == 0:
                continue
            exact = torch.ones(n_rows, dtype=torch.bool)
            baseline = exact
            probe = ExactProbe(n_rows)
            if screen.method != "exact":
                estimate = estimates[c]
                at = positions.cpu()
                for name in estimated:
                    columns[f"estimate_{name}"].append(estimate[name][at].numpy())
                if screen.method == "two_stage":
                    probe = ExactProbe(n_rows, partial(probe_deletions, row, positions, is_gene))
                exact, baseline = screen.exact_positions(c, at, estimate[estimated[0]][at], probe)
            if screen.mode == "delete":
                variant_sets = [_deleted(row, positions[(exact & ~probe.done).to(device)])]
            else:
                variant_sets = [
                    _moved_to_front(row, positions, lead),
                    _inserted_in_front(row, inserts, lead, trail, model.max_length),
                ]
            columns["cell"].append(np.full(n_rows, c))
            columns["token"].append(torch.cat([row[positions], inserts]).cpu().numpy())
            where = torch.cat([positions, torch.full_like(inserts, -1)])
            columns["position"].append(where.cpu().numpy())
            columns["exact"].append(exact.numpy())
            columns["baseline"].append(baseline.numpy())
            scores = {name: np.full(n_rows, np.nan, np.float32) for name in [*targets, "magnitude"]}
            variant_sets = [v for v in variant_sets if v.shape[0]]
            if variant_sets or probe.done.any():
                states = model.hidden_states(row[None, :], layer=layer_index, validate=False)
                states = states.float()
                original = _pool(states, lead, trail, pooling)
                on_states = None
                if shifts is not None:
                    deleted = positions[(exact & ~probe.done).to(device)]
                    on_states = partial(shifts.add, row, states[0], deleted, is_gene)
                pooled = probe.merged(exact, [embed(v, on_states) for v in variant_sets])
                for name, target in targets.items():
                    shift = F.cosine_similarity(pooled, target[None, :]) - F.cosine_similarity(
                        original, target[None, :]
                    )
                    scores[name][exact.numpy()] = shift.cpu().numpy()
                magnitude = 1 - F.cosine_similarity(pooled, original)
                scores["magnitude"][exact.numpy()] = magnitude.cpu().numpy()
            for name, values in scores.items():
                columns[f"score_{name}"].append(values)
            if screen.anchor is not None:
                combined = np.full(n_rows, np.nan, np.float32)
                alone = np.full(n_rows, np.nan, np.float32)
                found = torch.nonzero(row == screen.anchor).flatten()
                at = int(found[0]) if found.numel() else -1
                paired = exact.to(device) & (positions != at)
                if at >= 0 and variant_sets and bool(paired.any()):
                    without, both = anchor_variants(row, at, positions[paired])
                    goal = targets.get("goal")
                    alone[:] = _score(embed(without), original, goal).cpu().numpy()
                    combined[paired.cpu().numpy()] = _score(embed(both), original, goal).cpu()
                columns["anchor_combined"].append(combined)
                columns["anchor_alone"].append(alone)
    table = pd.DataFrame({k: np.concatenate(v) if v else np.empty(0) for k, v in columns.items()})
    return table, None if shifts is None else shifts.frame()


def _score(pooled: torch.Tensor, original: torch.Tensor, goal: torch.Tensor | None):
    """Score variants: the shift toward ``goal``, or the magnitude without one."""
    if goal is None:
        return 1 - F.cosine_similarity(pooled, original)
    return F.cosine_similarity(pooled, goal[None, :]) - F.cosine_similarity(original, goal[None, :])


def _gradient_chunks(
    cells: np.ndarray, n_tokens: np.ndarray, token_budget: int, rows: int
) -> list[np.ndarray]:
    """Split ``cells`` into runs of consecutive cells, one padded gradient pass each.

    Each cell takes ``rows`` rows. A chunk holds at most ``token_budget`` padded tokens and,
    because masked attention keeps every layer's ``length x length`` scores for the backward
    pass, at most about 2**26 scores per head and layer (one cell always fits).
    """
    out, begin, width = [], 0, 0
    for i, c in enumerate(cells):
        wider = max(width, int(n_tokens[c]))
        count = (i - begin + 1) * rows
        if i > begin and (count * wider > token_budget or count * wider**2 > 2**26):
            out.append(cells[begin:i])
            begin, wider = i, int(n_tokens[c])
        width = wider
    out.append(cells[begin:])
    return [chunk for chunk in out if len(chunk)]


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
    max_cells: int | None,
    emb_layer: int,
    pooling: str,
    min_cells: int,
    alternative: str,
    n_null_genes: int,
    key_added: str,
    store_per_cell: bool,
    token_budget: int | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    random_state: int,
    copy: bool,
) -> AnnData | None:
    given, model = model, encoder_of(model)
    layer_index = hidden_layer_index(model, emb_layer)
    check_pooling(model, pooling)
    alt_states = [str(a) for a in alt_states]
    if state_key is None:
        if start_state is not None or goal_state is not None or alt_states:
            raise ValueError("start_state, goal_state and alt_states need state_key.")
    elif start_state is None or goal_state is None:
        raise ValueError("With state_key, give both start_state and goal_state.")
    _check_states(adata, state_key, [s for s in (start_state, goal_state, *alt_states) if s])
    if state_key is not None:
        warn_if_not_finetuned_on(given, state_key, [start_state, goal_state])
    listed = _listed_tokens(model, genes)
    if combine and listed is None:
        raise ValueError("combine=True perturbs a listed set of genes together; pass genes=[...].")
    if combine and mode != "delete":
        raise ValueError("combine=True is supported for deletion only.")
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}.")
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

    target = adata.copy() if copy else adata
    # Under torchrun each process screens its own share of the cells; all get every result.
    ctx = setup_distributed(settings.resolve_device(device))
    plan = execution_plan(ctx.device, dtype)
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
    if anchor is not None:
        n_anchor_cells = check_anchor_present(tokens, n_tokens, start, anchor, anchor_gene)
    lead = 1 if model.vocab.has_cls else 0
    genes_per_cell = n_tokens[start] - 2 * lead
    if listed is None:
        variants = genes_per_cell
    elif mode == "delete":
        variants = np.minimum(genes_per_cell, len(listed))
    else:  # every listed gene is moved to the front or inserted
        variants = np.full(len(start), len(listed))
    params_cost = warn_if_slow_on_cpu(
        model,
        n_tokens[start],
        np.ones(len(start)) if combine else variants,
        layer_index,
        device_type=plan.device.type,
        mode="deletion" if mode == "delete" else "overexpression",
    )
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
            plan=plan,
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
        "estimated_cpu_seconds": round(params_cost, 1),
        "execution_plan": plan.as_dict(),
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
            plan=plan,
            budget=budget,
        )
        return target if copy else None

    null_genes = np.empty(0, dtype=np.int64)
    if listed is not None:
        special = np.asarray(list(model.vocab.special_tokens.values()))
        null_genes = rank_matched_background(
            tokens,
            n_tokens,
            start,
            listed,
            n_null_genes,
            special=special,
            min_cells=min_cells,
            random_state=random_state,
        )
        params["null_genes"] = [str(g) for g in model.vocab.gene_by_token[null_genes]]
    # Without null genes (none asked for, or none expressed) the listed genes face each other.
    null_tokens = null_genes if len(null_genes) else None
    params["null"] = null_description(null_tokens is not None)
    screened = None if listed is None else np.union1d(listed, null_genes)
    screen = _Screen(
        mode, targets, screened, method, n_exact, n_background, random_state, gene_shifts, anchor
    )
    try:
        table, pairs = _run_screen(
            model,
            tokens,
            n_tokens,
            start[ctx.rank :: ctx.world_size],
            screen,
            layer_index=layer_index,
            pooling=pooling,
            plan=plan,
            token_budget=budget,
        )
        table = pd.concat(ctx.gather(table), ignore_index=True)
        pair_frames = ctx.gather(pairs) if gene_shifts else []
    finally:
        ctx.close()
    params["n_processes"] = ctx.world_size
    main = "goal" if targets else "magnitude"
    if anchor is not None:
        alone = table["anchor_alone"] + table[f"score_{main}"]
        table["anchor_interaction"] = table["anchor_combined"] - alone
    exact = table["exact"].to_numpy(bool)
    if method == "first_order":
        scored, score = table, table[f"estimate_{main}"].to_numpy()
    else:
        scored = table[exact]
        score = scored[f"score_{main}"].to_numpy()
    result = gene_statistics(
        scored["cell"].to_numpy(),
        scored["token"].to_numpy(),
        scored["position"].to_numpy(),
        score,
        min_cells=min_cells,
        baseline=scored["baseline"].to_numpy(bool),
        alternative=alternative,
        null_tokens=null_tokens,
    )
    var_token = var_tokens(target)

    def per_var(values: np.ndarray, tokens: np.ndarray = result.token, fill: float = np.nan):
        if listed is not None:  # the null genes were the listed genes' null, not results
            keep = np.isin(tokens, listed)
            tokens, values = tokens[keep], values[keep]
        if len(tokens) == 0:
            return np.full(len(var_token), fill)
        return token_values_to_var(var_token, tokens, values, fill)

    def gene_means(column: str, rows: pd.DataFrame = table) -> np.ndarray:
        means = rows.groupby("token")[column].mean()
        return per_var(means.to_numpy(), means.index.to_numpy())

    exact_rows = table[exact]
    target.var[f"{key_added}_shift"] = gene_means(f"score_{main}", exact_rows)
    target.var[f"{key_added}_zscore"] = per_var(result.zscore)
    target.var[f"{key_added}_pval"] = per_var(result.pval)
    target.var[f"{key_added}_fdr"] = per_var(result.fdr)
    target.var[f"{key_added}_n_cells"] = per_var(result.n_cells, fill=0).astype(np.int64)
    target.var[f"{key_added}_ci_low"] = per_var(result.ci_low)
    target.var[f"{key_added}_ci_high"] = per_var(result.ci_high)
    target.var[f"{key_added}_frac_toward"] = per_var(result.frac_toward)
    for alt in alt_states:
        target.var[f"{key_added}_shift_{alt}"] = gene_means(f"score_{alt}", exact_rows)
    if method != "exact":
        target.var[f"{key_added}_estimate"] = gene_means(f"estimate_{main}")
        for alt in alt_states:
            target.var[f"{key_added}_estimate_{alt}"] = gene_means(f"estimate_{alt}")
        counts = table.groupby("token").size()
        target.var[f"{key_added}_n_cells_estimate"] = per_var(
            counts.to_numpy(), counts.index.to_numpy(), fill=0
        ).astype(np.int64)
    if store_per_cell:
        if len(exact_rows):
            target.layers[key_added] = _per_cell_layer(
                target, exact_rows, f"score_{main}", var_token
            )
        if method != "exact":
            target.layers[f"{key_added}_estimate"] = _per_cell_layer(
                target, table, f"estimate_{main}", var_token
            )
    params["method"] = method
    if anchor is not None:
        target.var[f"{key_added}_anchor_combined"] = gene_means("anchor_combined", exact_rows)
        target.var[f"{key_added}_anchor_interaction"] = gene_means("anchor_interaction", exact_rows)
        paired = table[table["anchor_combined"].notna()]
        counts = paired.groupby("token").size()
        target.var[f"{key_added}_anchor_n_cells"] = per_var(
            counts.to_numpy(), counts.index.to_numpy(), fill=0
        ).astype(np.int64)
        alone = table.groupby("cell")["anchor_alone"].first().dropna()
        params["anchor_gene"] = str(anchor_gene)
        params["anchor_shift"] = float(alone.mean()) if len(alone) else float("nan")
        params["n_anchor_cells"] = int(n_anchor_cells)
    if gene_shifts:
        params["n_gene_shift_pairs"] = write_gene_shifts(target, pair_frames, var_token, key_added)
    params["gene_shifts"] = bool(gene_shifts)
    if method == "two_stage":
        params["n_exact"] = int(n_exact)
        params["n_background"] = int(n_background)
    params["exact_share"] = float(exact.mean()) if len(table) else 0.0
    params["statistics_from"] = _STATISTICS_FROM[method]
    params["n_genes_tested"] = int(np.isfinite(result.fdr).sum())
    params["n_null_genes"] = int(result.n_null.max(initial=0))
    params["n_perturbations"] = int(exact.sum())
    params["n_estimates"] = len(table) if method != "exact" else 0
    target.uns[key_added] = params
    return target if copy else None


_STATISTICS_FROM = {
    "exact": "exact deletions of every gene",
    "first_order": "first-order estimates (no exact deletion ran)",
    "two_stage": "exact deletions of each cell's candidates and of a rank-matched random "
    "background; the rank baselines and the residual spread come from the background",
}


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
    plan,
    budget,
) -> None:
    """Delete all listed genes together from each start cell; per-cell shifts into obs."""
    variant, n_variant = _remove_tokens(tokens[start], n_tokens[start], listed)
    args = dict(emb_layer=emb_layer, pooling=pooling, plan=plan, token_budget=budget)
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


_DELETION_PARAMETERS = """    n_exact
        Candidates per cell deleted exactly with ``method="two_stage"``, chosen in two
        rounds (see Notes). Default 48: the smallest of 10, 16, 24, 32, 48, 64 whose
        candidates held at least 95% of each cell's exact top 10 with fine-tuned classifiers
        at 256 tokens per cell, on synthetic states and on Kang 2018 (0.96 each; 32 held
        0.91); see ``bench/RESULTS.md``.
    n_background
        Random rank-matched genes per cell, besides the candidates, deleted exactly with
        ``method="two_stage"`` as the null of the statistics (default ``n_exact // 4``).
    gene_shifts
        Also record, for every exact deletion, how far each other gene of the cell moves:
        ``1 - cos`` of that gene's own hidden state at ``layer``, original against variant
        (Geneformer's ``cell_and_gene`` mode). Needs ``"exact"`` or ``"two_stage"`` (whose
        exact stage it covers); refused with ``"first_order"``.
    anchor_gene
        Also delete this gene together with each other gene deleted exactly, in the start
        cells that have it (Geneformer's combinations with an anchor). The interaction
        ``combined - (anchor alone + gene alone)`` is positive when the pair moves the cell
        further than the two deletions' separate effects added up (synergy), negative when
        less (redundancy). Needs ``"exact"`` or ``"two_stage"``.
"""

_SHARED_PARAMETERS = """
    Parameters
    ----------
    adata
        Cells; tokens in ``obsm["geneformer_tokens"]`` or raw counts to make them from.
    model
        The classifier from :func:`~scgeneformer.tl.finetune` on ``state_key`` (its encoder
        is screened), or a :class:`~scgeneformer.Geneformer`. A model never fine-tuned on
        the states gets a warning: its embedding need not separate them.
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
    method
        ``"exact"`` builds and embeds every variant (``L`` forwards of length ``L`` per
        cell). ``"first_order"`` (deletion only) estimates every gene's score from one
        forward and one backward pass per cell, through a gate on each token as an attention
        key and in the pooling (see Notes); no variant is built. ``"two_stage"`` (deletion
        only) runs the first-order pass, then deletes exactly each cell's ``n_exact``
        candidates and ``n_background`` other genes at matching ranks. The candidates come
        in two rounds: the largest estimates (five eighths of ``n_exact``), then the largest
        estimates corrected by the first round's errors (exact minus estimate), which are
        interpolated over the token position (the estimate misses the shift of the later
        positions, which varies slowly with the position).
{deletion_parameters}    max_cells
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
    n_null_genes
        With a gene list, also perturb this many random genes expressed in the same cells,
        each drawn near a listed gene in mean rank and number of cells
        (:func:`~scgeneformer.tl._background.rank_matched_background`), and test the listed
        genes against them; they are recorded in ``uns[key_added]["null_genes"]``,
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
        Seed for the ``max_cells`` subset, the two-stage background and the random
        projections of the first-order magnitude.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    None, or a new AnnData with ``copy=True``. Writes, per gene, ``var[f"{key_added}_shift"]``
    (mean exact shift toward the goal over the cells where it was deleted exactly; NaN
    where it never was, so all NaN with ``"first_order"``), ``_pval`` and ``_fdr`` (against
    the other genes' rank-matched shifts, see Notes), ``_zscore`` (the rank-adjusted
    statistic they come from), ``_n_cells`` (the cells those statistics use), and
    ``_shift_{state}`` per alt state; ``_ci_low`` and ``_ci_high`` (a 95% t-interval of the
    mean shift across its cells) and ``_frac_toward`` (the share of them the perturbation
    moved toward the goal; without states, the share it changed at all). With
    ``"first_order"`` and ``"two_stage"`` also ``_estimate`` (mean first-order estimate over
    every cell with the gene), ``_estimate_{state}`` and ``_n_cells_estimate``; with
    ``store_per_cell`` the estimates go to ``layers[f"{key_added}_estimate"]`` beside the
    exact ``layers[key_added]``.
    ``uns[key_added]`` holds the parameters, the test direction, the null and its
    ``null_genes`` (with a gene list), ``method``, ``n_exact``, ``exact_share`` (the
    share of (cell, gene) pairs deleted exactly) and ``statistics_from``. With
    ``gene_shifts=True``: sparse ``varp[f"{key_added}_gene_shift"]`` (deleted x affected
    gene, the mean downstream shift over the cells where both were present and the first
    was deleted exactly) and ``varp[f"{key_added}_gene_shift_n_cells"]`` (those cells).
    With ``anchor_gene``: ``var[f"{key_added}_anchor_combined"]`` (mean score of deleting
    the anchor with the gene), ``_anchor_interaction`` (mean interaction, as above) and
    ``_anchor_n_cells``, over the cells with both; ``uns[key_added]["anchor_shift"]`` is the
    anchor's own mean score over its cells.

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

    Which numbers the statistics come from depends on ``method``. ``"exact"``: every exact
    deletion. ``"first_order"``: the estimates, ranked and tested the same way (estimates
    of a gene are comparable across cells, but their scale is not the exact shift's).
    ``"two_stage"``: only exact deletions, of the candidates and of the background; the rank
    baseline of every deletion and the residual spread come from the background alone,
    which was chosen at random, not for its estimates. Candidates are still selected for high
    estimates, so a gene's statistic comes from the cells where it looked promising: a
    screen to choose genes for follow-up, as the exact one is.

    The first-order estimate gives token ``j`` a gate ``g_j`` (1: present): ``log g_j`` is
    added to every query's attention logits for key ``j`` in every layer, and ``g_j``
    weights the token in the mean pooling. Closing the gate is the deletion except for the
    shift of later positions; ``-d score / d g_j`` at the cell is its first-order estimate.
    Without states the magnitude's gradient vanishes; its leading second-order term is
    estimated from 16 random projections of the pooled embedding's derivative.

    Screen with a model fine-tuned on ``state_key`` (the classifier from
    :func:`~scgeneformer.tl.finetune`): a pretrained-only model need not embed the states
    apart, and on Kang 2018 it ranks the interferon genes last.

    **Cost.** Each variant is one forward pass of the cell's length, so a cell of L genes
    costs L passes of length L. Measured on a 2-core CPU in float32
    (``bench/bench_in_silico.py``): V1-10M at 128 tokens, 239 variants/s. Scaled from that
    rate by operation count: V1-10M at 2,048 tokens about 6 variants/s (a full cell about 6
    minutes); V2-104M at 4,096 tokens about 0.15 variants/s. GPU rates are not measured yet.
    Before a CPU screen estimated at more than five minutes, a warning gives the estimate;
    ``uns[key_added]["estimated_cpu_seconds"]`` records it.
"""


@renamed_keywords(layer="emb_layer", batch_tokens="token_budget")
def in_silico_delete(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    alt_states: Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    method: str = "exact",
    n_exact: int | None = None,
    n_background: int | None = None,
    gene_shifts: bool = False,
    anchor_gene: str | None = None,
    combine: bool = False,
    max_cells: int | None = None,
    emb_layer: int = -1,
    pooling: str = "mean",
    min_cells: int = 3,
    alternative: str = "greater",
    n_null_genes: int = 200,
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
    >>> clf = sgf.tl.finetune(adata, model, label_key="condition")  # doctest: +SKIP
    >>> sgf.tl.in_silico_delete(
    ...     adata, clf, state_key="condition", start_state="stim", goal_state="ctrl"
    ... )  # doctest: +SKIP
    >>> adata.var.sort_values("in_silico_delete_zscore", ascending=False).head()  # doctest: +SKIP
    >>> sgf.pl.deletion_ranking(adata)  # doctest: +SKIP
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
        method=method,
        n_exact=n_exact,
        n_background=n_background,
        gene_shifts=gene_shifts,
        anchor_gene=anchor_gene,
        max_cells=max_cells,
        emb_layer=emb_layer,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_null_genes=n_null_genes,
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
    model: Geneformer | GeneformerClassifier,
    *,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    alt_states: Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    method: str = "exact",
    max_cells: int | None = None,
    emb_layer: int = -1,
    pooling: str = "mean",
    min_cells: int = 3,
    alternative: str = "greater",
    n_null_genes: int = 200,
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
    ...     adata, clf, state_key="state", start_state="disease", goal_state="healthy"
    ... )  # doctest: +SKIP
    >>> sgf.pl.deletion_ranking(adata, "in_silico_overexpress")  # doctest: +SKIP
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
        method=method,
        n_exact=None,
        n_background=None,
        gene_shifts=False,
        anchor_gene=None,
        max_cells=max_cells,
        emb_layer=emb_layer,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_null_genes=n_null_genes,
        key_added=key_added,
        store_per_cell=store_per_cell,
        token_budget=token_budget,
        device=device,
        dtype=dtype,
        random_state=random_state,
        copy=copy,
    )


in_silico_delete.__doc__ = in_silico_delete.__doc__.replace(
    "{parameters}", _SHARED_PARAMETERS.replace("{deletion_parameters}", _DELETION_PARAMETERS)
)
in_silico_overexpress.__doc__ = in_silico_overexpress.__doc__.replace(
    "{parameters}", _SHARED_PARAMETERS.replace("{deletion_parameters}", "")
)
