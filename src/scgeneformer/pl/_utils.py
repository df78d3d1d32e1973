"""What the plots here share: new Axes, a legend beside them, saving, showing or handing back."""

from __future__ import annotations

import os
from typing import Any

import matplotlib.pyplot as plt
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.legend import Legend
from matplotlib.transforms import ScaledTranslation


def finish(ax: Axes, show: bool | None, save: str | os.PathLike | None) -> Axes | None:
    """Save the figure to ``save`` if given; show it (default: when not saving); return Axes.

    As in scanpy, the Axes come back only when the figure is not shown.
    """
    figure = ax.get_figure()
    if save is not None:
        figure.savefig(save, bbox_inches="tight", dpi=150)
    if show is None:
        show = save is None and plt.isinteractive()
    if show:
        plt.show()
        return None
    return ax


def new_axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    """Return ``ax``, or the Axes of a new figure of ``size`` inches."""
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=size)
    return ax


def legend_beside(ax: Axes, neighbour: Axes, handles: list, **kwargs: Any) -> Legend:
    """Put ``ax``'s legend to the right of ``neighbour`` (e.g. a colour bar), past its labels.

    The offset is measured once in inches from the neighbour's tick and axis labels, and the
    legend is anchored to the neighbour's Axes, so it follows the neighbour when a layout
    engine or ``bbox_inches="tight"`` moves it, and never covers data or the colour scale.
    """
    figure = ax.get_figure()
    renderer = figure.canvas.get_renderer()
    outer = neighbour.get_tightbbox(renderer)  # also places an Axes that a divider locates
    edge = neighbour.get_window_extent(renderer)
    offset = (outer.x1 - edge.x1) / figure.dpi + 0.1
    anchor = neighbour.transAxes + ScaledTranslation(offset, 0.0, figure.dpi_scale_trans)
    options = dict(loc="upper left", frameon=False, fontsize=8, title_fontsize=9)
    options.update(kwargs)
    return ax.legend(handles=handles, bbox_to_anchor=(1.0, 1.0), bbox_transform=anchor, **options)


def stored_result(adata: AnnData, slot: str, required: tuple[str, ...], run: str) -> dict:
    """Return ``adata.uns[slot]``, the record a tool left for a plot; say what to run if not.

    Parameters
    ----------
    adata
        The AnnData the tool wrote into.
    slot
        The ``uns`` key, e.g. ``"state_finetune"``.
    required
        Keys the plot reads; a record without one of them is from another kind of run.
    run
        The call that writes the record, for the error message.
    """
    result = adata.uns.get(slot)
    if not isinstance(result, dict) or any(k not in result for k in required):
        found = "is absent" if result is None else f"holds no {', '.join(required)}"
        raise ValueError(f"adata.uns[{slot!r}] {found}; run {run} first.")
    return result
