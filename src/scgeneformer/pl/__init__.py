"""Plots."""

from ._deletion import deletion_ranking, deletion_volcano
from ._training import loss_curve

__all__ = ["deletion_ranking", "deletion_volcano", "loss_curve"]
