"""The Geneformer encoder: presets, model, attention paths and HF-layout checkpoints."""

from .classifier import GeneformerClassifier
from .config import PRESETS, GeneformerConfig
from .geneformer import Geneformer

__all__ = ["PRESETS", "Geneformer", "GeneformerClassifier", "GeneformerConfig"]
