"""Heatmap of the cells' embedding dimensions, cells grouped by a label (Geneformer's plot_embs)."""

from __future__ import annotations

import os
import warnings
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.patches import Patch

from .._docs import doc_params, doc_plot_output
from ._utils import finish, legend_beside, new_axes


def _embedding(adata: AnnData, basis: str) -> tuple[str, np.ndarray]:
    """Return the ``obsm`` key and the matrix of ``basis``, accepting scanpy's "X_"-less names."""
    for name in (basis, f"X_{basis}"):
        if name in adata.obsm:
            return name, np.asarray(adata.obsm[name], dtype=float)
    raise KeyError(
        f"adata.obsm has no {basis!r}; the embeddings present are {list(adata.obsm)}. Run "
        f"sgf.tl.embed(adata, model, key_added={basis!r}) first, or pass basis=<one of them>."
    )


def _groups(adata: AnnData, groupby: str) -> pd.Categorical:
    if groupby not in adata.obs.columns:
        raise KeyError(
            f"adata.obs has no column {groupby!r}; the columns are {list(adata.obs.columns)}."
        )
    labels = adata.obs[groupby]
    if isinstance(labels.dtype, pd.CategoricalDtype):
        # The user's category order (as scanpy plots it), unused categories dropped.
        return labels.cat.remove_unused_categories().array
    return pd.Categorical(labels.astype("string").astype(object).where(labels.notna()))


def _group_colors(adata: AnnData, groupby: str, categories: pd.Index) -> list[tuple]:
    """Colours of ``uns[f"{groupby}_colors"]`` (scanpy's) when they fit, else a palette."""
    stored = adata.uns.get(f"{groupby}_colors")
    all_categories = adata.obs[groupby]
    if (
        stored is not None
        and isinstance(all_categories.dtype, pd.CategoricalDtype)
        and len(stored) == len(all_categories.cat.categories)
    ):
        by_name = dict(zip(all_categories.cat.categories, stored, strict=True))
        return [to_rgba(by_name[c]) for c in categories]
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(len(categories))]


def _scale_dims(values: np.ndarray) -> np.ndarray:
    """Each dimension from 0 (its lowest cell) to 1 (its highest), as seaborn's standard_scale=1.

    Embedding dimensions differ in spread by orders of magnitude, so unscaled, a few dimensions
    would take the whole colour range.
    """
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return (values - low) / span


@doc_params(plot_output=doc_plot_output)
def embedding_heatmap(
    adata: AnnData,
    groupby: str,
    *,
    basis: str = "X_geneformer",
    max_cells_per_group: int | None = 500,
    standard_scale: Literal["var"] | None = "var",
    cmap: str = "magma",
    random_state: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | None:
    """Heatmap of the cells' embedding dimensions, the cells grouped by a label.

    One row per cell, one column per embedding dimension (Geneformer's ``plot_embs`` heatmap).
    The cells are ordered by group (the categories' order), in their input order within a
    group; a colour bar at the left marks the groups, and the legend of groups and the colour
    scale stand beside the heatmap, outside the data.

    Parameters
    ----------
    adata
        Cells with an embedding, e.g. after :func:`scgeneformer.tl.embed`.
    groupby
        ``obs`` column to group the cells by (e.g. ``"cell_type"``). Cells without a label are
        left out, with a warning.
    basis
        ``obsm`` key of the embedding; ``"geneformer"`` finds ``"X_geneformer"``, as in scanpy.
    max_cells_per_group
        Show at most this many cells of each group, drawn at random (``random_state``), so that
        large data stay readable and a large group does not hide a small one; None shows all.
    standard_scale
        ``"var"``: scale each dimension to 0-1 over the cells shown (as seaborn's
        ``standard_scale=1``, which Geneformer uses); None: the raw values.
    cmap
        Colour map of the values.
    random_state
        Seed of the per-group subsampling.
    {plot_output}

    Returns
    -------
    The heatmap's Axes when ``show`` is False, else None. Its image holds the values drawn
    (``ax.images[0].get_array()``: cells by dimensions, in the order shown).

    Examples
    --------
    >>> import anndata as ad, pandas as pd
    >>> adata = ad.AnnData(obs=pd.DataFrame({"cell_type": list("BTBTNB")}, index=list("abcdef")))
    >>> adata.obsm["X_geneformer"] = np.arange(24.0).reshape(6, 4)
    >>> ax = sgf.pl.embedding_heatmap(adata, groupby="cell_type", show=False)
    >>> ax.images[0].get_array().shape  # 6 cells (B, B, B, N, T, T) by 4 dimensions
    (6, 4)
    >>> [t.get_text() for t in ax.get_legend().get_texts()]
    ['B', 'N', 'T']
    """
    key, values = _embedding(adata, basis)
    groups = _groups(adata, groupby)
    labelled = ~pd.isna(groups)
    if not labelled.any():
        raise ValueError(f"No cell has a label in obs[{groupby!r}].")
    if not labelled.all():
        warnings.warn(
            f"{int((~labelled).sum())} of {adata.n_obs} cells have no {groupby!r} label and are "
            "left out of the heatmap.",
            UserWarning,
            stacklevel=2,
        )
    if max_cells_per_group is not None and max_cells_per_group < 1:
        raise ValueError(
            f"max_cells_per_group must be at least 1 or None, got {max_cells_per_group}."
        )
    if standard_scale not in ("var", None):
        raise ValueError(f"standard_scale must be 'var' or None, got {standard_scale!r}.")

    rng = np.random.default_rng(random_state)
    codes = np.asarray(groups.codes)
    rows = []
    for code in range(len(groups.categories)):
        members = np.flatnonzero(codes == code)
        if max_cells_per_group is not None and len(members) > max_cells_per_group:
            # Sorted again, so that within a group the cells keep their input order.
            members = np.sort(rng.choice(members, max_cells_per_group, replace=False))
        rows.append(members)
    order = np.concatenate(rows)
    shown = values[order]
    if not np.isfinite(shown).all():
        raise ValueError(
            f"obsm[{key!r}] holds NaN or inf for some cells; embed them again or leave them out."
        )
    if standard_scale == "var":
        shown = _scale_dims(shown)

    ax = new_axes(ax, (7.5, 4.5))
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap)
    ax.set_yticks([])
    ax.set_xlabel(f"dimension of {key}")

    # The group bar: one cell-wide colour strip left of the heatmap, on the same rows.
    # Inset Axes are the heatmap's children, so layout engines and bbox_inches="tight" see
    # them (and their labels) as part of it.
    bar = ax.inset_axes((-0.035, 0.0, 0.025, 1.0))
    colors = _group_colors(adata, groupby, groups.categories)
    bar.imshow(
        codes[order][:, None],
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap(colors),
        vmin=-0.5,
        vmax=len(colors) - 0.5,
    )
    bar.set_xticks([])
    bar.set_yticks([])
    for spine in bar.spines.values():
        spine.set_visible(False)
    bar.set_ylabel(f"{len(order):,} cells, grouped by {groupby}")
    # Group boundaries as thin lines across the heatmap, so a group's rows are easy to find.
    for edge in np.cumsum([len(r) for r in rows])[:-1]:
        ax.axhline(edge - 0.5, color="white", lw=0.6)

    scale = ax.inset_axes((1.015, 0.0, 0.02, 1.0))
    label = "scaled value (0-1 per dimension)" if standard_scale == "var" else "value"
    ax.figure.colorbar(image, cax=scale, label=label)
    handles = [
        Patch(color=c, label=str(name)) for c, name in zip(colors, groups.categories, strict=True)
    ]
    legend_beside(ax, scale, handles, title=groupby)
    return finish(ax, show, save)
