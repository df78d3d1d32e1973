"""Tools: pretraining, embedding, fine-tuning and in silico perturbation."""

from ._embed import embed
from ._in_silico import in_silico_delete, in_silico_overexpress

__all__ = ["embed", "in_silico_delete", "in_silico_overexpress"]
