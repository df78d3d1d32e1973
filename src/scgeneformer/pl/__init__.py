"""Plots."""

from ._deletion import deletion_ranking, deletion_volcano

__all__ = ["deletion_ranking", "deletion_volcano"]
