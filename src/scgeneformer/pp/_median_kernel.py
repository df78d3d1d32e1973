"""Numba kernels for exact non-zero CP10k medians: count, scatter gene by gene, select."""

from __future__ import annotations

import numba
import numpy as np

from ._rank_kernel import gather_row


@numba.njit(cache=True)
def place_cp10k(
    indptr, indices, data, col_gene, col_shared, shared_gene, ones, totals, cursor, spill
):  # pragma: no cover - compiled
    """Advance ``cursor[g]`` once for every row expressing gene g, writing first.

    With a non-empty ``spill``, the row's ``count / total * 10,000`` of g goes to
    ``spill[cursor[g]]``, so consecutive chunks fill each gene's stretch in turn. With an empty
    ``spill`` nothing is written and ``cursor`` ends up counting the expressing rows.
    ``ones`` (a median of 1 for every gene) makes :func:`gather_row` return CP10k values.
    """
    width = 1
    for r in range(indptr.shape[0] - 1):
        width = max(width, indptr[r + 1] - indptr[r])
    genes = np.empty(width, dtype=np.int64)
    values = np.empty(width, dtype=np.float64)
    shared_sum = np.zeros(max(shared_gene.shape[0], 1), dtype=np.float64)
    touched = np.empty(max(shared_gene.shape[0], 1), dtype=np.int64)
    write = spill.shape[0] > 0
    for r in range(indptr.shape[0] - 1):
        n = gather_row(
            indptr[r],
            indptr[r + 1],
            indices,
            data,
            col_gene,
            col_shared,
            shared_gene,
            ones,
            totals[r],
            shared_sum,
            touched,
            genes,
            values,
        )
        for i in range(n):
            if write:
                spill[cursor[genes[i]]] = values[i]
            cursor[genes[i]] += 1


@numba.njit(parallel=True, cache=True)
def stretch_medians(spill, starts, lengths, genes):  # pragma: no cover - compiled
    """Median of ``spill[starts[g]:starts[g] + lengths[g]]`` for each g in ``genes``.

    Equal to ``numpy.median`` bit for bit: the middle value, or the mean of the two middle
    values computed as numpy does, ``(lower + upper) / 2``.
    """
    out = np.empty(genes.shape[0], dtype=np.float64)
    for i in numba.prange(genes.shape[0]):
        g = genes[i]
        n = lengths[g]
        half = n // 2
        part = np.partition(spill[starts[g] : starts[g] + n].copy(), half)
        if n % 2:
            out[i] = part[half]
        else:
            out[i] = (part[:half].max() + part[half]) / 2
    return out
