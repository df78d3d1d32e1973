"""Running a screen: cells chosen, state embeddings, the variants, statistics into AnnData.

:func:`screen` is what ``tl.in_silico_delete`` and ``tl.in_silico_overexpress`` call: it
checks the request (``_screen``), runs the variants (``_variants``) on this process's share of
the cells, gathers every process's rows, tests each gene (``_perturb_stats``) and writes the
documented slots.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import wraps

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from anndata import AnnData

from .._plan import ExecutionPlan, execution_plan
from .._settings import settings
from .._slots import positions_of, token_values_to_var, var_tokens
from ..model import Geneformer, GeneformerClassifier
from ..train._distributed import Distributed, setup_distributed
from ._anchor import check_anchor_present
from ._background import rank_matched_background
from ._cost import warn_if_slow_on_cpu
from ._downstream import write_gene_shifts
from ._inference import encode_cells
from ._model_arg import encoder_of
from ._perturb_stats import GeneStats, gene_statistics, null_description
from ._screen import (
    ScreenRequest,
    check_request,
    in_state,
    state_cells,
    warn_if_listed_outside_var,
)
from ._tokens import cell_tokens
from ._variants import Screen, run_screen


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


def _closes_its_process_group(
    screen: Callable[..., AnnData | None],
) -> Callable[..., AnnData | None]:
    """Destroy a process group the screen started, on every way out (return or error).

    Under torchrun the screen starts its own group (:func:`setup_distributed`); one left
    behind would be joined by the next tool in the process. A group the caller had already
    started is theirs and stays.
    """

    @wraps(screen)
    def run(*args, **kwargs) -> AnnData | None:
        had_group = dist.is_available() and dist.is_initialized()
        try:
            return screen(*args, **kwargs)
        finally:
            if not had_group and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    return run


@_closes_its_process_group
def screen(adata: AnnData, model: Geneformer | GeneformerClassifier, **arguments) -> AnnData | None:
    """Run the screen that ``arguments`` (the public tools' keywords, and ``mode``) ask for."""
    request = check_request(adata, model, **arguments)
    model = encoder_of(model)
    target = adata.copy() if request.copy else adata
    # Under torchrun each process screens its own share of the cells; all get every result.
    ctx = setup_distributed(settings.resolve_device(request.device))
    plan = execution_plan(ctx.device, request.dtype)
    tokens, n_tokens = cell_tokens(target, model)
    if request.listed is not None:
        warn_if_listed_outside_var(model, request.listed, var_tokens(target))
    budget = request.token_budget or settings.token_budget
    start, n_start_total = _start_cells(target, request, n_tokens)
    n_anchor_cells = 0
    if request.anchor is not None:
        n_anchor_cells = check_anchor_present(
            tokens, n_tokens, start, request.anchor, request.anchor_gene
        )
    cost = _warn_if_slow(target, model, request, n_tokens, start, plan)
    targets = {}
    if request.state_key is not None:
        for state, name in [(request.goal_state, "goal")] + [(a, a) for a in request.alt_states]:
            rows = state_cells(target, request.state_key, state, n_tokens)
            targets[name] = _state_embedding(
                model, tokens[rows], n_tokens[rows], request, plan, desc=f"state {state}"
            )
    params = _base_params(model, request, targets, start, n_start_total, cost, plan)
    if request.combine:
        _combined(target, model, tokens, n_tokens, start, targets, params, request, ctx, plan)
        return target if request.copy else None

    null_genes = _null_genes(model, tokens, n_tokens, start, request, params)
    # Without null genes (none asked for, or none expressed) the listed genes face each other.
    null_tokens = null_genes if len(null_genes) else None
    params["null"] = null_description(null_tokens is not None)
    screened = None if request.listed is None else np.union1d(request.listed, null_genes)
    spec = Screen(
        request.mode,
        targets,
        screened,
        request.method,
        request.n_exact,
        request.n_background,
        request.random_state,
        request.gene_shifts,
        request.anchor,
    )
    try:
        table, pairs = run_screen(
            model,
            tokens,
            n_tokens,
            start[ctx.rank :: ctx.world_size],
            spec,
            layer_index=request.layer_index,
            pooling=request.pooling,
            plan=plan,
            token_budget=budget,
        )
        table = pd.concat(ctx.gather(table), ignore_index=True)
        pair_frames = ctx.gather(pairs) if request.gene_shifts else []
    finally:
        ctx.close()
    params["n_processes"] = ctx.world_size
    main = "goal" if targets else "magnitude"
    if request.anchor is not None:
        alone = table["anchor_alone"] + table[f"score_{main}"]
        table["anchor_interaction"] = table["anchor_combined"] - alone
    result = _statistics(table, request, null_tokens, main)
    writer = _ResultWriter(target, request, table, result)
    writer.write(main)
    if request.anchor is not None:
        params.update(writer.write_anchor(n_anchor_cells))
    if request.gene_shifts:
        params["n_gene_shift_pairs"] = write_gene_shifts(
            target, pair_frames, writer.var_token, request.key_added
        )
    params.update(_result_params(request, table, result))
    target.uns[request.key_added] = params
    return target if request.copy else None


def _null_genes(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    start: np.ndarray,
    request: ScreenRequest,
    params: dict,
) -> np.ndarray:
    """Draw the listed genes' rank-matched null genes (recorded in ``params``)."""
    null_genes = np.empty(0, dtype=np.int64)
    if request.listed is not None:
        special = np.asarray(list(model.vocab.special_tokens.values()))
        null_genes = rank_matched_background(
            tokens,
            n_tokens,
            start,
            request.listed,
            request.n_null_genes,
            special=special,
            min_cells=request.min_cells,
            random_state=request.random_state,
        )
        params["null_genes"] = [str(g) for g in model.vocab.gene_by_token[null_genes]]
    return null_genes


def _statistics(
    table: pd.DataFrame, request: ScreenRequest, null_tokens: np.ndarray | None, main: str
) -> GeneStats:
    """Test each gene on the rows the method scored: exact deletions, or the estimates."""
    if request.method == "first_order":
        scored, column = table, f"estimate_{main}"
    else:
        scored, column = table[table["exact"].to_numpy(bool)], f"score_{main}"
    return gene_statistics(
        scored["cell"].to_numpy(),
        scored["token"].to_numpy(),
        scored["position"].to_numpy(),
        scored[column].to_numpy(),
        min_cells=request.min_cells,
        baseline=scored["baseline"].to_numpy(bool),
        alternative=request.alternative,
        null_tokens=null_tokens,
    )


def _start_cells(
    adata: AnnData, request: ScreenRequest, n_tokens: np.ndarray
) -> tuple[np.ndarray, int]:
    """Choose the start cells screened (``max_cells`` at random); also say how many there were."""
    if request.state_key is None:
        start = np.flatnonzero(n_tokens > 0)
        if len(start) == 0:
            raise ValueError("No cell has tokens; nothing to perturb.")
    else:
        start = state_cells(adata, request.state_key, request.start_state, n_tokens)
    n_start_total = len(start)
    if request.max_cells is not None and len(start) > request.max_cells:
        rng = np.random.default_rng(request.random_state)
        start = np.sort(rng.choice(start, size=int(request.max_cells), replace=False))
    return start, n_start_total


def _warn_if_slow(
    adata: AnnData,
    model: Geneformer,
    request: ScreenRequest,
    n_tokens: np.ndarray,
    start: np.ndarray,
    plan: ExecutionPlan,
) -> float:
    """Warn before a long CPU screen, and of start cells without tokens; the estimated cost."""
    lead = 1 if model.vocab.has_cls else 0
    genes_per_cell = n_tokens[start] - 2 * lead
    if request.listed is None:
        variants = genes_per_cell
    elif request.mode == "delete":
        variants = np.minimum(genes_per_cell, len(request.listed))
    else:  # every listed gene is moved to the front or inserted
        variants = np.full(len(start), len(request.listed))
    cost = warn_if_slow_on_cpu(
        model,
        n_tokens[start],
        np.ones(len(start)) if request.combine else variants,
        request.layer_index,
        device_type=plan.device.type,
        mode="deletion" if request.mode == "delete" else "overexpression",
    )
    in_start = in_state(adata, request.state_key, request.start_state)
    skipped = int(((n_tokens == 0) & in_start).sum())
    if skipped:
        # Four frames up is the public tool (above: screen() and its process-group wrapper).
        warnings.warn(
            f"{skipped} start cells have no tokens and are skipped.", UserWarning, stacklevel=4
        )
    return cost


def _state_embedding(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    request: ScreenRequest,
    plan: ExecutionPlan,
    *,
    desc: str,
) -> torch.Tensor:
    """Mean embedding of a state's cells, the target a screen scores against."""
    pooled = encode_cells(
        model,
        tokens,
        n_tokens,
        emb_layer=request.emb_layer,
        pooling=request.pooling,
        plan=plan,
        token_budget=request.token_budget or settings.token_budget,
        desc=desc,
    ).cells
    return torch.as_tensor(pooled.astype(np.float64).mean(axis=0), dtype=torch.float32)


def _base_params(
    model: Geneformer,
    request: ScreenRequest,
    targets: dict[str, torch.Tensor],
    start: np.ndarray,
    n_start_total: int,
    cost: float,
    plan: ExecutionPlan,
) -> dict:
    """Record in ``uns[key]`` what was asked, before any result."""
    listed = request.listed
    return {
        "mode": request.mode,
        "state_key": request.state_key or "",
        "start_state": "" if request.start_state is None else str(request.start_state),
        "goal_state": "" if request.goal_state is None else str(request.goal_state),
        "alt_states": list(request.alt_states),
        "genes": "all" if listed is None else [str(g) for g in model.vocab.gene_by_token[listed]],
        "emb_layer": int(request.emb_layer),
        "pooling": request.pooling,
        "min_cells": int(request.min_cells),
        "n_start_cells": len(start),
        "n_start_cells_total": int(n_start_total),
        "score": "cos(variant, goal) - cos(original, goal)"
        if targets
        else "1 - cos(variant, original)",
        "alternative": request.alternative,
        "model_preset": model.preset or "custom",
        "vocabulary_sha256": model.vocab.sha256,
        "random_state": int(request.random_state),
        "estimated_cpu_seconds": round(cost, 1),
        "execution_plan": plan.as_dict(),
    }


class _ResultWriter:
    """Writes a screen's per-gene results into ``var`` and its per-cell ones into layers."""

    def __init__(
        self, adata: AnnData, request: ScreenRequest, table: pd.DataFrame, result: GeneStats
    ) -> None:
        self.adata, self.request, self.table, self.result = adata, request, table, result
        self.var_token = var_tokens(adata)
        self.exact_rows = table[table["exact"].to_numpy(bool)]

    def per_var(
        self, values: np.ndarray, tokens: np.ndarray | None = None, fill: float = np.nan
    ) -> np.ndarray:
        tokens = self.result.token if tokens is None else tokens
        listed = self.request.listed
        if listed is not None:  # the null genes were the listed genes' null, not results
            keep = np.isin(tokens, listed)
            tokens, values = tokens[keep], values[keep]
        if len(tokens) == 0:
            return np.full(len(self.var_token), fill)
        return token_values_to_var(self.var_token, tokens, values, fill)

    def gene_means(self, column: str, rows: pd.DataFrame | None = None) -> np.ndarray:
        means = (self.table if rows is None else rows).groupby("token")[column].mean()
        return self.per_var(means.to_numpy(), means.index.to_numpy())

    def counts(self, rows: pd.DataFrame) -> np.ndarray:
        counts = rows.groupby("token").size()
        return self.per_var(counts.to_numpy(), counts.index.to_numpy(), fill=0).astype(np.int64)

    def write(self, main: str) -> None:
        var, key, result, request = (
            self.adata.var,
            self.request.key_added,
            self.result,
            self.request,
        )
        exact_rows = self.exact_rows
        var[f"{key}_shift"] = self.gene_means(f"score_{main}", exact_rows)
        var[f"{key}_zscore"] = self.per_var(result.zscore)
        var[f"{key}_pval"] = self.per_var(result.pval)
        var[f"{key}_fdr"] = self.per_var(result.fdr)
        var[f"{key}_n_cells"] = self.per_var(result.n_cells, fill=0).astype(np.int64)
        var[f"{key}_ci_low"] = self.per_var(result.ci_low)
        var[f"{key}_ci_high"] = self.per_var(result.ci_high)
        var[f"{key}_frac_toward"] = self.per_var(result.frac_toward)
        for alt in request.alt_states:
            var[f"{key}_shift_{alt}"] = self.gene_means(f"score_{alt}", exact_rows)
        if request.method != "exact":
            var[f"{key}_estimate"] = self.gene_means(f"estimate_{main}")
            for alt in request.alt_states:
                var[f"{key}_estimate_{alt}"] = self.gene_means(f"estimate_{alt}")
            var[f"{key}_n_cells_estimate"] = self.counts(self.table)
        if request.store_per_cell:
            if len(exact_rows):
                self.adata.layers[key] = _per_cell_layer(
                    self.adata, exact_rows, f"score_{main}", self.var_token
                )
            if request.method != "exact":
                self.adata.layers[f"{key}_estimate"] = _per_cell_layer(
                    self.adata, self.table, f"estimate_{main}", self.var_token
                )

    def write_anchor(self, n_anchor_cells: int) -> dict:
        """Write the anchor combination columns; return their ``uns`` entries."""
        var, key, table = self.adata.var, self.request.key_added, self.table
        var[f"{key}_anchor_combined"] = self.gene_means("anchor_combined", self.exact_rows)
        var[f"{key}_anchor_interaction"] = self.gene_means("anchor_interaction", self.exact_rows)
        var[f"{key}_anchor_n_cells"] = self.counts(table[table["anchor_combined"].notna()])
        alone = table.groupby("cell")["anchor_alone"].first().dropna()
        return {
            "anchor_gene": str(self.request.anchor_gene),
            "anchor_shift": float(alone.mean()) if len(alone) else float("nan"),
            "n_anchor_cells": int(n_anchor_cells),
        }


def _result_params(request: ScreenRequest, table: pd.DataFrame, result: GeneStats) -> dict:
    """Say in ``uns[key]`` what was run and what the statistics stand on."""
    exact = table["exact"].to_numpy(bool)
    params = {"method": request.method, "gene_shifts": bool(request.gene_shifts)}
    if request.method == "two_stage":
        params["n_exact"] = int(request.n_exact)
        params["n_background"] = int(request.n_background)
    params["exact_share"] = float(exact.mean()) if len(table) else 0.0
    params["statistics_from"] = _STATISTICS_FROM[request.method]
    params["n_genes_tested"] = int(np.isfinite(result.fdr).sum())
    params["n_null_genes"] = int(result.n_null.max(initial=0))
    params["n_perturbations"] = int(exact.sum())
    params["n_estimates"] = len(table) if request.method != "exact" else 0
    return params


_STATISTICS_FROM = {
    "exact": "exact deletions of every gene",
    "first_order": "first-order estimates (no exact deletion ran)",
    "two_stage": "exact deletions of each cell's candidates and of a rank-matched random "
    "background; the rank baselines and the residual spread come from the background",
}


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
    adata: AnnData,
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    start: np.ndarray,
    targets: dict[str, torch.Tensor],
    params: dict,
    request: ScreenRequest,
    ctx: Distributed,
    plan: ExecutionPlan,
) -> None:
    """Delete all listed genes together from each start cell; per-cell shifts into obs.

    Under torchrun each process takes its share of the start cells (every ``world_size``-th)
    and all processes get every shift.
    """
    mine = start[ctx.rank :: ctx.world_size]
    variant, n_variant = _remove_tokens(tokens[mine], n_tokens[mine], request.listed)
    args = dict(
        emb_layer=request.emb_layer,
        pooling=request.pooling,
        plan=plan,
        token_budget=request.token_budget or settings.token_budget,
    )
    original = torch.as_tensor(encode_cells(model, tokens[mine], n_tokens[mine], **args).cells)
    changed = torch.as_tensor(encode_cells(model, variant, n_variant, **args).cells)
    if targets:
        goal = targets["goal"][None, :]
        shift = F.cosine_similarity(changed, goal) - F.cosine_similarity(original, goal)
    else:
        shift = 1 - F.cosine_similarity(changed, original)
    column = np.full(adata.n_obs, np.nan)
    for cells, shifts in ctx.gather((mine, shift.numpy())):
        column[cells] = shifts
    adata.obs[f"{request.key_added}_combined_shift"] = column
    params["combined"] = True
    params["n_processes"] = ctx.world_size
    params["combined_mean_shift"] = float(np.nanmean(column))
    adata.uns[request.key_added] = params
