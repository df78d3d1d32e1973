"""Plots of an in silico screen: the top genes, and shift against significance."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .._docs import doc_params, doc_plot_output
from .._screen_table import screen_table, screen_title
from ._utils import finish, new_axes

_AXIS_LABELS = {
    "zscore": "rank-adjusted z-score (toward the goal)",
    "shift": "mean shift toward the goal (cosine)",
    "estimate": "mean first-order estimate of the shift toward the goal (cosine)",
}
_ESTIMATED_ZSCORE = "rank-adjusted z-score of first-order estimates (toward the goal)"


def _measure(adata: AnnData, key: str, sort_by: str) -> tuple[str, str]:
    """Return the column to plot for ``sort_by`` and its axis label.

    A ``first_order`` screen deletes nothing exactly: its ``shift`` column is empty and its
    statistics come from the estimates, so it is plotted by the estimate, labelled as one.
    """
    estimated_only = (
        f"{key}_shift" in adata.var.columns
        and adata.var[f"{key}_shift"].isna().all()
        and f"{key}_estimate" in adata.var.columns
    )
    if sort_by == "shift" and estimated_only:
        sort_by = "estimate"
    if sort_by == "zscore" and estimated_only:
        return "zscore", _ESTIMATED_ZSCORE
    return sort_by, _AXIS_LABELS.get(sort_by, "")


def readable_x_ticks(ax: Axes) -> None:
    """Give the x axis about one tick an inch, and tiny values their power of ten in the label.

    Shifts and first-order estimates are small decimals ("0.015", "0.00004"): at the default
    density their tick labels run into each other on a narrow panel, and matplotlib's own
    "1e-4" beside the axis sits on a long axis label. Call it after the label and the data.
    """
    width = ax.get_window_extent().width / ax.get_figure().dpi
    steps = [1, 2, 2.5, 5, 10]
    ax.xaxis.set_major_locator(MaxNLocator(nbins=max(3, round(1.2 * width)), steps=steps))
    ax.tick_params(axis="both", labelsize=9)
    largest = max(abs(v) for v in ax.get_xlim())
    if not 0 < largest < 1e-2:
        return
    power = int(np.floor(np.log10(largest)))
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda value, _: f"{value / 10**power:g}".replace("-", "\N{MINUS SIGN}"))
    )
    label = ax.get_xlabel()
    scale = rf"$\times 10^{{{power}}}$"
    ax.set_xlabel(f"{label[:-1]}, {scale})" if label.endswith(")") else f"{label} ({scale})")


def _symbols(adata: AnnData, gene_symbols: str | None) -> str | None:
    """Resolve ``gene_symbols="auto"``: the ``var`` column ``gene_symbol`` when there is one."""
    if gene_symbols != "auto":
        return gene_symbols
    return "gene_symbol" if "gene_symbol" in adata.var.columns else None


def _tested(
    adata: AnnData, key: str, sort_by: str, min_cells: int | None, gene_symbols: str | None
) -> pd.DataFrame:
    symbols = _symbols(adata, gene_symbols)
    table = screen_table(adata, key, sort_by=sort_by, min_cells=min_cells, gene_symbols=symbols)
    tested = table[table["tested"]]
    if tested.empty:
        needed = adata.uns.get(key, {}).get("min_cells", 3) if min_cells is None else min_cells
        raise ValueError(
            f"No gene of the screen {key!r} was perturbed in {needed}+ cells; screen more cells "
            "(max_cells) or lower min_cells."
        )
    return tested


def _minus_log10(fdr: pd.Series) -> np.ndarray:
    return -np.log10(np.clip(fdr.fillna(1.0).to_numpy(), 1e-300, 1.0))


@doc_params(plot_output=doc_plot_output)
def deletion_ranking(
    adata: AnnData,
    key: str = "in_silico_delete",
    *,
    n_top: int = 20,
    sort_by: str = "zscore",
    min_cells: int | None = None,
    gene_symbols: str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Bar chart of the genes whose perturbation moves cells most toward the goal state.

    Genes are ranked by the rank-adjusted z-score (each gene against the other genes perturbed
    at nearby ranks in the same cells); bars are coloured by -log10 FDR, and the right-hand
    labels give the cells each gene was perturbed in.

    Parameters
    ----------
    adata
        AnnData with the results of :func:`~scgeneformer.tl.in_silico_delete` (or
        ``in_silico_overexpress``).
    key
        The screen's ``key_added``.
    n_top
        Genes to show.
    sort_by
        ``"zscore"`` (default) or ``"shift"``, the raw mean shift, which mostly restates how
        highly a gene ranks in its cells; ``"estimate"``, the mean first-order estimate of
        the shift (screens with ``method="first_order"`` or ``"two_stage"``). A
        ``first_order`` screen deleted nothing exactly, so there ``"shift"`` plots the
        estimate, and the axis says so (its z-scores are of the estimates too).
    min_cells
        Leave out genes perturbed in fewer cells; default the screen's own ``min_cells``.
    gene_symbols
        Column of ``var`` to label genes with; ``"auto"`` uses ``gene_symbol`` if present.
    {plot_output}

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.tl.in_silico_delete(adata, clf, state_key="condition", start_state="stim",
    ...                         goal_state="ctrl")  # doctest: +SKIP
    >>> sgf.pl.deletion_ranking(adata, n_top=15)  # doctest: +SKIP
    """
    column, label = _measure(adata, key, sort_by)
    top = _tested(adata, key, column, min_cells, gene_symbols).head(n_top).iloc[::-1]
    ax = new_axes(ax, (6.5, 0.28 * len(top) + 1.6))
    strength = _minus_log10(top["fdr"])
    scale = ScalarMappable(Normalize(0, max(strength.max(), 1.0)), cmap="viridis")
    y = np.arange(len(top))
    ax.barh(y, top[column], color=scale.to_rgba(strength))
    ax.set_yticks(y, top["gene"], fontsize=9)
    ax.set_ylim(-0.6, len(top) - 0.4)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(label)
    readable_x_ticks(ax)
    ax.set_title(screen_title(adata, key), fontsize=10, loc="left")
    # Cells per gene as labels of a right-hand axis: outside the bars, never clipped.
    cells = ax.twinx()
    cells.set_ylim(ax.get_ylim())
    cells.set_yticks(y, [f"{n} cells" for n in top["n_cells"]], fontsize=8, color="dimgrey")
    cells.tick_params(right=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
        cells.spines[side].set_visible(False)
    # Past the cell-count labels (about an inch at their font size).
    pad = 1.0 / ax.figure.get_size_inches()[0]
    ax.figure.colorbar(scale, ax=[ax, cells], label="-log10 FDR", pad=pad, fraction=0.04)
    return finish(ax, show, save)


def deletion_volcano(
    adata: AnnData,
    key: str = "in_silico_delete",
    *,
    n_labels: int = 10,
    min_cells: int | None = None,
    fdr_threshold: float = 0.05,
    gene_symbols: str | None = "auto",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Mean shift against -log10 FDR for every gene of a screen; the top genes labelled.

    Labels are placed so that none overlaps another: each starts beside its gene and, where it
    would cover a label already placed, moves up or down to the nearest free place, joined to
    its gene by a thin line. A ``first_order`` screen is plotted by its first-order estimate.

    Parameters
    ----------
    adata, key, min_cells, gene_symbols, ax, show, save
        As in :func:`deletion_ranking`.
    n_labels
        Label this many genes, the first by z-score among those below ``fdr_threshold``.
    fdr_threshold
        Draws a line there and colours the genes below it.

    Returns
    -------
    The Axes when ``show`` is False, else None.

    Examples
    --------
    >>> sgf.pl.deletion_volcano(adata)  # doctest: +SKIP
    """
    column, label = _measure(adata, key, "shift")
    table = _tested(adata, key, "zscore", min_cells, gene_symbols)
    table = table[table[column].notna()]
    significance = _minus_log10(table["fdr"])
    hit = table["fdr"].to_numpy() < fdr_threshold
    ax = new_axes(ax, (6, 4.5))
    x = table[column].to_numpy()
    ax.scatter(x[~hit], significance[~hit], s=6, color="lightgrey", label="other")
    ax.scatter(x[hit], significance[hit], s=10, color="crimson", label=f"FDR < {fdr_threshold:g}")
    ax.axhline(-np.log10(fdr_threshold), color="grey", ls="--", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(label)
    ax.set_ylabel("-log10 FDR")
    ax.set_title(screen_title(adata, key), fontsize=10, loc="left")
    ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost genes
    readable_x_ticks(ax)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    labelled = hit & (np.cumsum(hit) <= n_labels)  # the table is in z-score order
    place_labels(ax, table["gene"][labelled].tolist(), x[labelled], significance[labelled])
    return finish(ax, show, save)


def place_labels(
    ax: Axes, labels: list[str], x: np.ndarray, y: np.ndarray, *, fontsize: float = 8
) -> list:
    """Annotate the points ``(x, y)`` with ``labels`` so that no two label boxes overlap.

    Taken from the highest point down, each label goes beside its point, right or left, at
    the free vertical place nearest to its point's level: "free" means its box meets no label
    placed before (a stack by y, in display space), and stays inside the Axes while there is
    room (outside only when the Axes are full). A label moved off its point's level gets a
    thin line to it. The axis limits are fixed first, so that the display positions measured
    are the ones drawn.

    Returns
    -------
    The annotations, in the order of ``labels``.
    """
    if not labels:
        return []
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    figure = ax.get_figure()
    renderer = figure.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([x, y]))
    frame = ax.get_window_extent(renderer)
    gap = 3 * figure.dpi / 72  # 3 points between a point and its label, and between labels
    sizes = []
    for text in labels:
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()

    # The labelled genes' own markers are obstacles too: a label must not hide a gene.
    radius = 2.5 * figure.dpi / 72
    markers = [(px - radius, py - radius, px + radius, py + radius) for px, py in points]
    placed: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1 in pixels

    def nearest_free(i: int, x0: float, inside: bool) -> float | None:
        """Return the bottom edge nearest label ``i``'s point where its box is free, or None."""
        width, height = sizes[i]
        others = [(b, gap) for b in placed] + [(m, gap) for j, m in enumerate(markers) if j != i]
        beside = [(b, g) for b, g in others if b[0] < x0 + width + g and x0 - g < b[2]]
        wanted = points[i][1] - height / 2
        # Where it wants to be, and just above or below each box in its columns: the free
        # place nearest to the wanted one is among these (just above all of them is free).
        candidates = [wanted]
        for b, g in beside:
            candidates += [b[3] + g, b[1] - g - height]
        if inside:
            if x0 < frame.x0 or x0 + width > frame.x1:
                return None
            candidates = [c for c in candidates if frame.y0 <= c and c + height <= frame.y1]
        for y0 in sorted(candidates, key=lambda c: abs(c - wanted)):
            if not any(y0 < b[3] + g / 2 and b[1] - g / 2 < y0 + height for b, g in beside):
                return y0
        return None

    where = [(0.0, 0.0, True)] * len(labels)
    for i in np.argsort(-points[:, 1], kind="stable"):
        (px, py), (width, height) = points[i], sizes[i]
        sides = {True: px + gap, False: px - gap - width}  # right of the point, left of it
        best = None
        for inside in (True, False):
            for right, x0 in sides.items():
                y0 = nearest_free(i, x0, inside)
                # The right side wins ties: labels read from their point.
                cost = None if y0 is None else abs(y0 + height / 2 - py) + (0 if right else 1)
                if cost is not None and (best is None or cost < best[0]):
                    best = (cost, x0, y0, right)
            if best is not None:
                break
        _, x0, y0, right = best
        placed.append((x0, y0, x0 + width, y0 + height))
        where[i] = (x0, y0, right)

    annotations = []
    to_points = 72 / figure.dpi
    for i, text in enumerate(labels):
        (px, py), (x0, y0, right) = points[i], where[i]
        moved = abs(y0 + sizes[i][1] / 2 - py) > sizes[i][1]
        line = dict(
            arrowstyle="-",
            color="grey",
            lw=0.5,
            shrinkA=0,
            shrinkB=2,
            relpos=(0 if right else 1, 0.5),
        )
        annotations.append(
            ax.annotate(
                text,
                (x[i], y[i]),
                xytext=((x0 - px) * to_points, (y0 - py) * to_points),
                textcoords="offset points",
                ha="left",
                va="bottom",
                fontsize=fontsize,
                arrowprops=line if moved else None,
            )
        )
    return annotations


@doc_params(plot_output=doc_plot_output)
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
    {plot_output}

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
    symbols = _symbols(adata, gene_symbols)
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
