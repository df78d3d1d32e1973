"""Tools: pretraining, embedding, fine-tuning and in silico perturbation."""

from ._embed import embed
from ._finetune import finetune
from ._geneformer_stats import perturbation_stats
from ._in_silico import in_silico_delete, in_silico_overexpress
from ._predict import predict
from ._pretrain import pretrain
from ._tune import tune_finetune

__all__ = [
    "embed",
    "finetune",
    "in_silico_delete",
    "in_silico_overexpress",
    "perturbation_stats",
    "predict",
    "pretrain",
    "tune_finetune",
]
