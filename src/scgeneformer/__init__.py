"""scgeneformer: Geneformer on AnnData.

Rank-value tokenization (:mod:`scgeneformer.pp`), the Geneformer encoder
(:class:`~scgeneformer.Geneformer`), tools (:mod:`scgeneformer.tl`), plots
(:mod:`scgeneformer.pl`) and example data (:mod:`scgeneformer.datasets`).
"""

from . import datasets, pl, pp, tl
from ._env import show_versions
from ._settings import settings
from ._version import __version__
from .model import Geneformer, GeneformerClassifier, GeneformerConfig
from .vocab import Vocabulary

__all__ = [
    "Geneformer",
    "GeneformerClassifier",
    "GeneformerConfig",
    "Vocabulary",
    "__version__",
    "datasets",
    "pl",
    "pp",
    "settings",
    "show_versions",
    "tl",
]
