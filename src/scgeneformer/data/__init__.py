"""Data plumbing: token-budget batching and packing, the on-disk token store, masking."""

from ._arrow_writer import write_arrow_dataset
from ._batching import pack_tokens, restore_order, token_budget_batches
from ._masking import GeneMasker, MaskedBatch
from ._sources import read_arrow_dataset
from ._store import TokenStore
from ._store_build import build_token_store

__all__ = [
    "GeneMasker",
    "MaskedBatch",
    "TokenStore",
    "build_token_store",
    "pack_tokens",
    "read_arrow_dataset",
    "restore_order",
    "token_budget_batches",
    "write_arrow_dataset",
]
