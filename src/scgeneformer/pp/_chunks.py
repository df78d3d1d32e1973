"""Reading a count matrix in CSR row chunks (in memory or backed), and its columns' keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


@dataclass(frozen=True)
class CountSource:
    """Where the counts of an AnnData live: ``X`` or a layer, in memory or backed."""

    matrix: object
    label: str

    @property
    def n_rows(self) -> int:
        """Number of cells."""
        return int(self.matrix.shape[0])


def count_source(adata: AnnData, layer: str | None) -> CountSource:
    """Pick ``adata.X`` or ``adata.layers[layer]``, with an error naming the layers present."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer= to name the layer that holds counts.")
        return CountSource(adata.X, "adata.X")
    if layer not in adata.layers:
        raise KeyError(
            f"layer={layer!r} is not in adata.layers; the layers are {list(adata.layers)}. "
            "Leave layer=None to use adata.X."
        )
    return CountSource(adata.layers[layer], f"adata.layers[{layer!r}]")


def iter_csr_chunks(source: CountSource, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first_row, chunk)`` with each chunk a CSR matrix of up to ``chunk_size`` rows.

    Dense, CSR and CSC matrices, anndata's backed sparse datasets and h5py dense datasets
    are all read one row slice at a time, so a backed matrix is never loaded whole.
    """
    matrix = source.matrix
    if isinstance(matrix, sp.csr_matrix | sp.csr_array) and matrix.has_canonical_format:
        if matrix.dtype == np.float16:  # scipy has no float16 sparse arithmetic
            matrix = _upcast_half(matrix)
        # Row slices of an in-memory CSR are views of its arrays: no copy, no validation.
        for start in range(0, source.n_rows, chunk_size):
            stop = min(start + chunk_size, source.n_rows)
            lo, hi = matrix.indptr[start], matrix.indptr[stop]
            chunk = sp.csr_matrix((stop - start, matrix.shape[1]), dtype=matrix.dtype)
            chunk.indptr = matrix.indptr[start : stop + 1] - lo
            chunk.indices = matrix.indices[lo:hi]
            chunk.data = matrix.data[lo:hi]
            yield start, chunk
        return
    for start in range(0, source.n_rows, chunk_size):
        stop = min(start + chunk_size, source.n_rows)
        block = matrix[start:stop]
        if hasattr(block, "compute"):  # dask: one row block computed at a time, as anndata does
            block = block.compute()
        block = _upcast_half(block)
        if sp.issparse(block):
            chunk = sp.csr_matrix(block)
        else:
            chunk = sp.csr_matrix(np.asarray(block))
        chunk.sum_duplicates()
        yield start, chunk


def _upcast_half(block):
    """float16 counts as float32: scipy's sparse types and the kernels do not take float16.

    Every integer float16 holds is exact in float32, so no count changes.
    """
    if getattr(block, "dtype", None) == np.float16:
        return block.astype(np.float32)
    return block


def shared_columns(column_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which columns share a key with another column, for the kernels to sum them.

    Returns ``(column_shared, shared_key)``: ``column_shared[j]`` is -1 for a column that
    alone has its key (or no key, -1), else its slot; ``shared_key[s]`` is slot s's key.

    Examples
    --------
    >>> shared_columns(np.array([5, 7, -1, 5, 9]))
    (array([ 0, -1, -1,  0, -1]), array([5]))
    """
    column_shared = np.full(len(column_key), -1, dtype=np.int64)
    keyed = np.flatnonzero(column_key >= 0)
    keys, slot_of_column, columns_per_key = np.unique(
        column_key[keyed], return_inverse=True, return_counts=True
    )
    shared = columns_per_key > 1
    is_shared = shared[slot_of_column]
    column_shared[keyed[is_shared]] = (np.cumsum(shared) - 1)[slot_of_column[is_shared]]
    return column_shared, keys[shared].astype(np.int64)
