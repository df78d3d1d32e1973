"""What the cell and gene tasks of ``tl.finetune`` share: a fresh classifier (scores: _metrics)."""

from __future__ import annotations

from typing import Literal

from ..model import Geneformer
from ..model._classifier import GeneformerClassifier
from ..model._lora import add_lora
from ..train._finetune_loop import FitOptions


def new_classifier(
    model: Geneformer,
    classes: list[str],
    *,
    task: Literal["cell", "gene"],
    label_key: str,
    options: FitOptions,
    random_state: int,
) -> GeneformerClassifier:
    """Copy ``model`` under a fresh head for ``classes``: its first layers frozen, or adapted.

    With ``options.adapter`` the copy's encoder is frozen whole and LoRA adapters go into its
    layers from ``options.freeze_layers`` on (the first layers then get none, so they stay
    frozen as without an adapter).
    """
    clf = GeneformerClassifier.from_encoder(
        model, classes, task=task, label_key=label_key, random_state=random_state
    )
    return prepared_for_training(clf, options)


def prepared_for_training(clf: GeneformerClassifier, options: FitOptions) -> GeneformerClassifier:
    """``clf`` with its first ``options.freeze_layers`` layers frozen, or LoRA-adapted."""
    if options.adapter is None:
        clf.freeze_layers(options.freeze_layers)
        return clf
    return add_lora(
        clf,
        options.adapter,
        freeze_layers=options.freeze_layers,
        quantize=options.quantize,
        device=options.device,
    )
