"""Plots of an in silico screen: the top genes, and shift against significance."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from ._utils import finish, new_axes


def _screen_table(
    adata: AnnData, key: str, gene_symbols: str | None, min_cells: int
) -> pd.DataFrame:
    column = f"{key}_shift"
    if column not in adata.var.columns:
        raise KeyError(
            f"adata.var has no {column!r}; run sgf.tl.in_silico_delete (or _overexpress) with "
            f"key_added={key!r} first."
        )
    if gene_symbols is not None and gene_symbols not in adata.var.columns:
        raise KeyError(f"gene_symbols={gene_symbols!r} is not a column of adata.var.")
    labels = adata.var[gene_symbols] if gene_symbols is not None else adata.var_names
    table = pd.DataFrame(
        {
            "gene": np.asarray(labels, dtype=str),
            "shift": adata.var[column].to_numpy(),
            "fdr": adata.var[f"{key}_fdr"].to_numpy(),
            "n_cells": adata.var[f"{key}_n_cells"].to_numpy(),
        }
    )
    table = table[table["shift"].notna() & (table["n_cells"] >= min_cells)]
    if table.empty:
        raise ValueError(f"No gene of the screen {key!r} was perturbed in {min_cells}+ cells.")
    return table


def _default_symbols(adata: AnnData) -> str | None:
    return "gene_symbol" if "gene_symbol" in adata.var.columns else None


def deletion_ranking(
    adata: AnnData,
    key: str = "in_silico_delete",
    *,
    n_top: int = 20,
    min_cells: int = 3,
    gene_symbols: str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Bar chart of the genes whose perturbation moves cells most toward the goal state.

    Bars give each gene's mean shift, coloured by -log10 FDR, labelled with the cells it was
    perturbed in.

    Parameters
    ----------
    adata
        AnnData with the results of :func:`~scgeneformer.tl.in_silico_delete`.
    key
        The screen's ``key_added``.
    n_top
        Genes to show.
    min_cells
        Leave out genes perturbed in fewer cells (their mean shift is noise).
    gene_symbols
        Column of ``var`` to label genes with; ``"auto"`` uses ``gene_symbol`` if present.
    ax, show, save
        As in scanpy: draw into ``ax``; show the figure; save it to this path.

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.tl.in_silico_delete(adata, model, state_key="state", start_state="disease",
    ...                         goal_state="healthy")  # doctest: +SKIP
    >>> sgf.pl.deletion_ranking(adata, n_top=15)  # doctest: +SKIP
    """
    symbols = _default_symbols(adata) if gene_symbols == "auto" else gene_symbols
    table = _screen_table(adata, key, symbols, min_cells)
    top = table.nlargest(n_top, "shift").iloc[::-1]
    ax = new_axes(ax, (6, 0.3 * len(top) + 1.2))
    strength = -np.log10(np.clip(top["fdr"].fillna(1.0).to_numpy(), 1e-300, 1.0))
    scale = ScalarMappable(Normalize(0, max(strength.max(), 1.0)), cmap="viridis")
    ax.barh(top["gene"], top["shift"], color=scale.to_rgba(strength))
    ax.figure.colorbar(scale, ax=ax, label="-log10 FDR")
    for y, (shift, n) in enumerate(zip(top["shift"], top["n_cells"], strict=True)):
        ax.annotate(f" {int(n)} cells", (shift, y), va="center", fontsize=7)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("mean shift toward goal (cosine)")
    ax.set_title(f"top {len(top)} genes: {key}")
    return finish(ax, show, save)


def deletion_volcano(
    adata: AnnData,
    key: str = "in_silico_delete",
    *,
    n_labels: int = 10,
    min_cells: int = 3,
    fdr_threshold: float = 0.05,
    gene_symbols: str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Mean shift against -log10 FDR for every gene of a screen; the top genes labelled.

    Parameters
    ----------
    adata, key, min_cells, gene_symbols, ax, show, save
        As in :func:`deletion_ranking`.
    n_labels
        Label this many genes with the largest shift among those below ``fdr_threshold``.
    fdr_threshold
        Draws a line there and colours the genes below it.

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.pl.deletion_volcano(adata)  # doctest: +SKIP
    """
    symbols = _default_symbols(adata) if gene_symbols == "auto" else gene_symbols
    table = _screen_table(adata, key, symbols, min_cells)
    significance = -np.log10(np.clip(table["fdr"].fillna(1.0).to_numpy(), 1e-300, 1.0))
    hit = table["fdr"].to_numpy() < fdr_threshold
    ax = new_axes(ax, (5.5, 4.5))
    ax.scatter(table["shift"][~hit], significance[~hit], s=6, color="lightgrey", label="other")
    ax.scatter(
        table["shift"][hit],
        significance[hit],
        s=10,
        color="crimson",
        label=f"FDR < {fdr_threshold:g}",
    )
    ax.axhline(-np.log10(fdr_threshold), color="grey", ls="--", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    labelled = table[hit].nlargest(n_labels, "shift")
    for gene, shift, fdr in zip(labelled["gene"], labelled["shift"], labelled["fdr"], strict=True):
        ax.annotate(gene, (shift, -np.log10(max(fdr, 1e-300))), fontsize=7)
    ax.set_xlabel("mean shift toward goal (cosine)")
    ax.set_ylabel("-log10 FDR")
    ax.legend(frameon=False, fontsize=8)
    return finish(ax, show, save)


def downstream_genes(
    adata: AnnData,
    gene: str,
    key: str = "in_silico_delete",
    *,
    n_top: int = 20,
    min_cells: int = 1,
    gene_symbols: str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Bar chart of the genes whose own embedding moves most when ``gene`` is deleted.

    Reads ``varp[f"{key}_gene_shift"]`` (``1 - cos`` of each affected gene's state at the
    layer read, original against variant, averaged over the cells where both genes were
    present), written by :func:`~scgeneformer.tl.in_silico_delete` with ``gene_shifts=True``;
    bars are labelled with those cells.

    Parameters
    ----------
    adata
        AnnData with the results of a screen run with ``gene_shifts=True``.
    gene
        The deleted gene: a ``var_names`` entry or a value of ``gene_symbols``.
    key
        The screen's ``key_added``.
    n_top
        Affected genes to show.
    min_cells
        Leave out affected genes seen in fewer cells.
    gene_symbols
        Column of ``var`` to label (and find) genes with; ``"auto"`` uses ``gene_symbol`` if
        present.
    ax, show, save
        As in scanpy: draw into ``ax``; show the figure; save it to this path.

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.tl.in_silico_delete(adata, model, state_key="state", start_state="disease",
    ...                         goal_state="healthy", gene_shifts=True)  # doctest: +SKIP
    >>> sgf.pl.downstream_genes(adata, "DRIVER1", n_top=10)  # doctest: +SKIP
    """
    slot = f"{key}_gene_shift"
    if slot not in adata.varp:
        raise KeyError(
            f"adata.varp has no {slot!r}; run sgf.tl.in_silico_delete with gene_shifts=True "
            f"and key_added={key!r} first."
        )
    symbols = _default_symbols(adata) if gene_symbols == "auto" else gene_symbols
    if symbols is not None and symbols not in adata.var.columns:
        raise KeyError(f"gene_symbols={symbols!r} is not a column of adata.var.")
    labels = np.asarray(adata.var[symbols] if symbols is not None else adata.var_names, str)
    hits = np.flatnonzero(adata.var_names == gene)
    if len(hits) == 0:
        hits = np.flatnonzero(labels == gene)
    if len(hits) == 0:
        raise KeyError(f"{gene!r} is neither in var_names nor in var[{symbols!r}].")
    shift = adata.varp[slot].tocsr()[hits[0]]
    cells = adata.varp[f"{slot}_n_cells"].tocsr()[hits[0]]
    table = pd.DataFrame(
        {
            "gene": labels[cells.indices],
            "shift": np.asarray(shift[0, cells.indices].todense()).ravel(),
            "n_cells": cells.data,
        }
    )
    table = table[table["n_cells"] >= min_cells]
    if table.empty:
        raise ValueError(
            f"Deleting {gene!r} shifted no gene seen in {min_cells}+ cells: was it deleted "
            "exactly in the screen (with two_stage, only candidates and background are)?"
        )
    top = table.nlargest(n_top, "shift").iloc[::-1]
    ax = new_axes(ax, (6, 0.3 * len(top) + 1.2))
    ax.barh(top["gene"], top["shift"], color="tab:blue")
    for y, (value, n) in enumerate(zip(top["shift"], top["n_cells"], strict=True)):
        ax.annotate(f" {int(n)} cells", (value, y), va="center", fontsize=7)
    ax.set_xlabel("mean shift of the gene's own embedding (1 - cosine)")
    ax.set_title(f"genes moved by deleting {gene}: {key}")
    return finish(ax, show, save)
