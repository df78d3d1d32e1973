"""Downstream genes (Geneformer's ``cell_and_gene`` mode): how each deletion moves the others.

For a variant that deletes the gene at position ``p``, every remaining gene's own hidden
state at the layer read is compared with its state in the original cell (the gene sits one
place earlier in the variant when it came after ``p``): ``1 - cos(original, variant)``.
Sums and cell counts accumulate per (deleted, affected) token pair over cells; each pair
occurs at most once per cell, so the count is the number of cells where both were present
and the deletion was run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData


class GeneShifts:
    """Running sums and cell counts of downstream shifts, token x token, on the CPU.

    Parameters
    ----------
    n_tokens
        Size of the vocabulary (token ids index the matrices).
    """

    def __init__(self, n_tokens: int) -> None:
        self.total = sp.csr_matrix((n_tokens, n_tokens))
        self.count = sp.csr_matrix((n_tokens, n_tokens))

    def add(
        self,
        row: torch.Tensor,
        original: torch.Tensor,
        deleted: torch.Tensor,
        is_gene: torch.Tensor,
        start: int,
        variants: torch.Tensor,
    ) -> None:
        """Add one chunk of a cell's deletions.

        Parameters
        ----------
        row
            The cell's tokens ``(length,)``.
        original
            The cell's hidden states ``(length, hidden)`` at the layer read.
        deleted
            The deleted position of each of the cell's variants.
        is_gene
            Which tokens of ``row`` are genes (special tokens are not reported).
        start
            Index of the chunk's first variant.
        variants
            The chunk's hidden states ``(variants, length - 1, hidden)``.
        """
        deleted = deleted[start : start + variants.shape[0]]
        cols = torch.arange(row.numel() - 1, device=row.device)
        # Position in the original cell of each token of each variant (as in _deleted).
        source = cols[None, :] + (cols[None, :] >= deleted[:, None]).long()
        shift = 1 - F.cosine_similarity(original[source], variants, dim=-1)
        keep = is_gene[source]
        deleted_token = row[deleted][:, None].expand_as(source)[keep].cpu().numpy()
        affected_token = row[source][keep].cpu().numpy()
        values = shift[keep].double().cpu().numpy()
        shape = self.total.shape
        self.total = self.total + sp.csr_matrix((values, (deleted_token, affected_token)), shape)
        ones = np.ones(len(values))
        self.count = self.count + sp.csr_matrix((ones, (deleted_token, affected_token)), shape)

    def frame(self) -> pd.DataFrame:
        """Return the pairs seen so far: deleted and affected token, sum of shifts, cells."""
        # The counts' pattern: a sum of shifts that is exactly 0 (genes before the deleted
        # one at the embedding layer) is still a pair that was seen.
        count, total = self.count.tocoo(), self.total.tocsr()
        return pd.DataFrame(
            {
                "deleted": count.row,
                "affected": count.col,
                "total": np.asarray(total[count.row, count.col]).ravel(),
                "count": count.data,
            }
        )


def write_gene_shifts(
    adata: AnnData, frames: list[pd.DataFrame], var_token: np.ndarray, key_added: str
) -> int:
    """Mean shifts and cell counts into ``varp``, genes at their token's first ``var`` column.

    ``frames`` come from the processes of a run (one without torchrun); pairs are summed
    across them. Returns the number of (deleted, affected) pairs written.
    """
    pairs = pd.concat(frames, ignore_index=True)
    pairs = pairs.groupby(["deleted", "affected"], as_index=False)[["total", "count"]].sum()
    column = pd.Series(np.arange(len(var_token)), index=var_token)
    column = column[~column.index.duplicated() & (column.index >= 0)]
    rows = column.reindex(pairs["deleted"].to_numpy()).to_numpy()
    cols = column.reindex(pairs["affected"].to_numpy()).to_numpy()
    ok = ~np.isnan(rows) & ~np.isnan(cols)
    at = (rows[ok].astype(np.int64), cols[ok].astype(np.int64))
    shape = (adata.n_vars, adata.n_vars)
    count = pairs["count"].to_numpy()[ok]
    mean = pairs["total"].to_numpy()[ok] / count
    adata.varp[f"{key_added}_gene_shift"] = sp.csr_matrix((mean, at), shape=shape)
    adata.varp[f"{key_added}_gene_shift_n_cells"] = sp.csr_matrix(
        (count.astype(np.int64), at), shape=shape
    )
    return int(ok.sum())
