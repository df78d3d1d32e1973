"""Tools: pretraining, embedding, fine-tuning and in silico perturbation."""

__all__: list[str] = []
