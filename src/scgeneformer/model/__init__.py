"""The Geneformer encoder: presets, model, attention paths and HF-layout checkpoints."""

from ._classifier import GeneformerClassifier
from ._config import PRESETS, GeneformerConfig
from ._geneformer import Geneformer
from ._lora import LoraOptions
from ._multitask import MultitaskClassifier

__all__ = [
    "PRESETS",
    "Geneformer",
    "GeneformerClassifier",
    "GeneformerConfig",
    "LoraOptions",
    "MultitaskClassifier",
]
