"""Preprocessing: rank-value tokenization of cells."""

from ._tokenize import rank_tokenize

__all__ = ["rank_tokenize"]
