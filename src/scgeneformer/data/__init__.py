"""Data plumbing for the model: token-budget batching, packing, and restoring input order."""

from .batching import pack_tokens, restore_order, token_budget_batches

__all__ = ["pack_tokens", "restore_order", "token_budget_batches"]
