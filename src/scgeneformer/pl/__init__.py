"""Plots."""

from ._classification import confusion_matrix
from ._deletion import deletion_ranking, deletion_volcano, downstream_genes
from ._training import loss_curve

__all__ = [
    "confusion_matrix",
    "deletion_ranking",
    "deletion_volcano",
    "downstream_genes",
    "loss_curve",
]
