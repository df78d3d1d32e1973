"""scgeneformer: Geneformer on AnnData.

Rank-value tokenization (:mod:`scgeneformer.pp`), the Geneformer encoder
(:class:`~scgeneformer.Geneformer`), tools (:mod:`scgeneformer.tl`), plots
(:mod:`scgeneformer.pl`), corpora on disk (:mod:`scgeneformer.data`) and example data
(:mod:`scgeneformer.datasets`).

The names below load on first use, so ``scgeneformer --help`` and ``import scgeneformer``
start in a fraction of a second; torch and scanpy come in with the first tool.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from . import data, datasets, pl, pp, tl
    from ._env import show_versions
    from ._settings import settings
    from .model import Geneformer, GeneformerClassifier, GeneformerConfig
    from .vocab import Vocabulary

# public name -> (module, attribute; None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "data": (".data", None),
    "datasets": (".datasets", None),
    "pl": (".pl", None),
    "pp": (".pp", None),
    "tl": (".tl", None),
    "settings": ("._settings", "settings"),
    "show_versions": ("._env", "show_versions"),
    "Geneformer": (".model", "Geneformer"),
    "GeneformerClassifier": (".model", "GeneformerClassifier"),
    "GeneformerConfig": (".model", "GeneformerConfig"),
    "Vocabulary": (".vocab", "Vocabulary"),
}

__all__ = [
    "Geneformer",
    "GeneformerClassifier",
    "GeneformerConfig",
    "Vocabulary",
    "__version__",
    "data",
    "datasets",
    "pl",
    "pp",
    "settings",
    "show_versions",
    "tl",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'scgeneformer' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
