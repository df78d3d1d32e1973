"""Example data sets."""

from ._synthetic import synthetic_states

__all__ = ["synthetic_states"]
