"""What every plot here does at the end: save if asked, show or hand back the Axes."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
from matplotlib.axes import Axes


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
