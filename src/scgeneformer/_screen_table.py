"""A screen's genes in the order every output shows them, and what the screen asked, in words.

The plots, the demo report, its CSV and the command line's table all read this one table, so
they rank alike: by the rank-adjusted z-score, genes perturbed in too few cells last and marked.
Raw mean shifts mostly restate how highly a gene ranks in its cells (deleting a top-ranked gene
moves any cell), so they are a column here, not the order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

SORT_KEYS = ("zscore", "shift", "estimate")


def screen_parameters(adata: AnnData, key: str) -> dict:
    """Return the ``uns[key]`` record of a screen; say what to run when it has not run."""
    if f"{key}_shift" not in adata.var.columns:
        raise KeyError(
            f"adata.var has no {key + '_shift'!r}; run sgf.tl.in_silico_delete (or "
            f"_overexpress) with key_added={key!r} first."
        )
    params = adata.uns.get(key, {})
    return dict(params) if isinstance(params, dict) else {}


def screen_table(
    adata: AnnData,
    key: str = "in_silico_delete",
    *,
    sort_by: str = "zscore",
    min_cells: int | None = None,
    gene_symbols: str | None = None,
) -> pd.DataFrame:
    """Every gene a screen perturbed, ranked; those seen in too few cells last, marked.

    Parameters
    ----------
    adata
        AnnData with the results of an in silico screen.
    key
        The screen's ``key_added``.
    sort_by
        ``"zscore"`` (the rank-adjusted statistic, the default), ``"shift"`` (raw mean shift
        of the exact deletions) or ``"estimate"`` (mean first-order estimate of the shift,
        after ``method="first_order"`` or ``"two_stage"``).
    min_cells
        Genes perturbed in fewer cells go last with ``tested`` False; default the screen's own
        ``min_cells``.
    gene_symbols
        Column of ``var`` for the ``gene`` column; default the var names.

    Returns
    -------
    One row per perturbed gene, indexed by var name: ``gene``, ``zscore``, ``shift``, ``pval``,
    ``fdr``, ``n_cells``, ``tested``, ``shift_{state}`` per alt state, and ``estimate`` where
    the screen made first-order estimates. A ``first_order`` screen deleted nothing exactly:
    its ``shift`` is NaN throughout, and its genes are those with an estimate.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> adata = ad.AnnData(np.zeros((1, 3)))
    >>> adata.var_names = ["A", "B", "C"]
    >>> adata.var["s_shift"] = [0.9, 0.1, 0.2]
    >>> adata.var["s_zscore"] = [5.0, 1.0, 3.0]
    >>> adata.var["s_pval"] = adata.var["s_fdr"] = [np.nan, 0.3, 0.01]
    >>> adata.var["s_n_cells"] = [1, 8, 9]
    >>> screen_table(adata, "s", min_cells=3)[["zscore", "n_cells", "tested"]]
       zscore  n_cells  tested
    C     3.0        9    True
    B     1.0        8    True
    A     5.0        1   False
    """
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by must be one of {SORT_KEYS}, got {sort_by!r}.")
    params = screen_parameters(adata, key)
    if min_cells is None:
        min_cells = int(params.get("min_cells", 3))
    if gene_symbols is not None and gene_symbols not in adata.var.columns:
        raise KeyError(
            f"gene_symbols={gene_symbols!r} is not a column of adata.var; the columns are "
            f"{list(adata.var.columns)}."
        )
    var = adata.var
    labels = var[gene_symbols] if gene_symbols is not None else var.index
    table = pd.DataFrame(
        {
            "gene": np.asarray(labels, dtype=str),
            "zscore": var[f"{key}_zscore"].to_numpy(),
            "shift": var[f"{key}_shift"].to_numpy(),
            "pval": var[f"{key}_pval"].to_numpy(),
            "fdr": var[f"{key}_fdr"].to_numpy(),
            "n_cells": var[f"{key}_n_cells"].to_numpy().astype(np.int64),
        },
        index=var.index.copy(),
    )
    for state in params.get("alt_states", []):
        table[f"shift_{state}"] = var[f"{key}_shift_{state}"].to_numpy()
    measured = table["shift"].notna()
    if f"{key}_estimate" in var.columns:
        table["estimate"] = var[f"{key}_estimate"].to_numpy()
        measured |= table["estimate"].notna()
    elif sort_by == "estimate":
        raise ValueError(
            f"The screen {key!r} made no first-order estimates (method="
            f"{params.get('method', 'exact')!r}); sort by 'zscore' or 'shift'."
        )
    table = table[(table["n_cells"] > 0) & measured].copy()
    table["tested"] = (table["n_cells"] >= min_cells) & table[sort_by].notna()
    table = table.sort_values(
        ["tested", sort_by], ascending=[False, False], na_position="last", kind="stable"
    )
    return table


def screen_title(adata: AnnData, key: str) -> str:
    """Say what the screen looked for, in words: "Genes whose deletion moves stim cells ..."."""
    params = screen_parameters(adata, key)
    action = {"delete": "deletion", "overexpress": "overexpression"}.get(
        params.get("mode", ""), "perturbation"
    )
    start, goal = params.get("start_state"), params.get("goal_state")
    if start and goal:
        return f"Genes whose {action} moves {start} cells toward {goal}"
    return f"Genes whose {action} changes the cells' embeddings most"
