"""Tools: pretraining, embedding, fine-tuning and in silico perturbation."""

from ._embed import embed

__all__ = ["embed"]
