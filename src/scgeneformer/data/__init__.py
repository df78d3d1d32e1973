"""Data plumbing: token-budget batching and packing, the on-disk token store, masking."""

from .batching import pack_tokens, restore_order, token_budget_batches
from .masking import GeneMasker, MaskedBatch
from .sources import read_arrow_dataset
from .store import TokenStore, build_token_store

__all__ = [
    "GeneMasker",
    "MaskedBatch",
    "TokenStore",
    "build_token_store",
    "pack_tokens",
    "read_arrow_dataset",
    "restore_order",
    "token_budget_batches",
]
