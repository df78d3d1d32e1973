"""Plots."""

from ._classification import confusion_matrix
from ._cross_validation import finetune_splits
from ._deletion import deletion_ranking, deletion_volcano, downstream_genes
from ._embedding import embedding_heatmap
from ._training import loss_curve
from ._tuning import tune_trials

__all__ = [
    "confusion_matrix",
    "deletion_ranking",
    "deletion_volcano",
    "downstream_genes",
    "embedding_heatmap",
    "finetune_splits",
    "loss_curve",
    "tune_trials",
]
