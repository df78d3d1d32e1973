"""Example data sets."""

from ._pbmc68k import pbmc68k_reduced
from ._synthetic import synthetic_states

__all__ = ["pbmc68k_reduced", "synthetic_states"]
