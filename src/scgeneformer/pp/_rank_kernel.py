"""Numba kernels for rank-value tokenization over CSR rows.

Geneformer's rank value of gene g in cell c is ``((count / total) * 10_000) / median[g]``,
evaluated in float64 in that order so that the ordering matches its numpy code bit for bit.
Genes are ordered by value, highest first; exact ties go to the smaller token id, which makes
the order independent of gene column order and identical on every machine.
"""

from __future__ import annotations

import numba
import numpy as np

TARGET_SUM = 10_000.0

# Codes for the first problem met in a row's values (0: none).
BAD_NONFINITE, BAD_NEGATIVE, BAD_NONINTEGER = 1, 2, 3


@numba.njit(parallel=True, cache=True)
def row_totals_checked(indptr, data):  # pragma: no cover - compiled
    """Sum each row in float64 and report the first non-count value of each row.

    Returns ``(totals, bad_code, bad_value)``; ``bad_code[r]`` is 0 when row r holds only
    finite non-negative integers.
    """
    n_rows = indptr.shape[0] - 1
    totals = np.zeros(n_rows, dtype=np.float64)
    bad_code = np.zeros(n_rows, dtype=np.int8)
    bad_value = np.zeros(n_rows, dtype=np.float64)
    for r in numba.prange(n_rows):
        acc = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            v = np.float64(data[k])
            code = 0
            if not np.isfinite(v):
                code = BAD_NONFINITE
            elif v < 0.0:
                code = BAD_NEGATIVE
            elif v != np.floor(v):
                code = BAD_NONINTEGER
            if code != 0:
                bad_code[r] = code
                bad_value[r] = v
                break
            acc += v
        totals[r] = acc
    return totals, bad_code, bad_value


@numba.njit(cache=True)
def _rank_order(neg_values, tokens):  # pragma: no cover - compiled
    """Entry indices by rank: value descending (``neg_values`` ascending), then token id.

    A radix sort on float32 keys (4 byte passes, skipping bytes all entries share) puts the
    entries in order up to float32 rounding; an insertion pass with exact float64 comparisons
    and the token tie rule then fixes the few neighbours that float32 could not tell apart.
    This is about 4x faster than a comparison sort of the float64 values.
    """
    n = neg_values.shape[0]
    keys = np.empty(n, dtype=np.uint32)
    for i in range(n):
        # Positive float32 bit patterns order like the values; inverting gives descending.
        keys[i] = ~np.float32(-neg_values[i]).view(np.uint32)
    order = np.arange(n)
    spare = np.empty(n, dtype=np.int64)
    counts = np.empty(256, dtype=np.int64)
    for shift in range(0, 32, 8):
        counts[:] = 0
        for i in range(n):
            counts[(keys[i] >> shift) & 255] += 1
        if counts.max() == n:
            continue
        running = 0
        for b in range(256):
            c = counts[b]
            counts[b] = running
            running += c
        for i in range(n):
            entry = order[i]
            b = (keys[entry] >> shift) & 255
            spare[counts[b]] = entry
            counts[b] += 1
        order, spare = spare, order
    # Written out in full: a helper call here measured twice as slow.
    for p in range(1, n):
        entry = order[p]
        value, token = neg_values[entry], tokens[entry]
        q = p - 1
        while q >= 0 and (
            neg_values[order[q]] > value
            or (neg_values[order[q]] == value and tokens[order[q]] > token)
        ):
            order[q + 1] = order[q]
            q -= 1
        order[q + 1] = entry
    return order


@numba.njit(parallel=True, cache=True)
def count_vocab_genes(indptr, indices, data, col_token, max_genes):  # pragma: no cover
    """Count the tokens each row will get: expressed vocabulary genes, capped at max_genes."""
    n_rows = indptr.shape[0] - 1
    counts = np.zeros(n_rows, dtype=np.int64)
    for r in numba.prange(n_rows):
        n = 0
        for k in range(indptr[r], indptr[r + 1]):
            if data[k] > 0 and col_token[indices[k]] >= 0:
                n += 1
        counts[r] = min(n, max_genes)
    return counts


@numba.njit(parallel=True, cache=True)
def rank_rows(
    indptr, indices, data, col_token, col_median, totals, offsets, out
):  # pragma: no cover - compiled
    """Write each row's top-ranked gene tokens into ``out[offsets[r]:offsets[r + 1]]``.

    ``col_token[j]`` is column j's token id (-1 outside the vocabulary), ``col_median[j]``
    its median. Columns must map to distinct tokens (duplicates are summed beforehand).
    """
    n_rows = indptr.shape[0] - 1
    for r in numba.prange(n_rows):
        n_out = offsets[r + 1] - offsets[r]
        if n_out == 0:
            continue
        start, stop = indptr[r], indptr[r + 1]
        neg_values = np.empty(stop - start, dtype=np.float64)
        tokens = np.empty(stop - start, dtype=np.int64)
        n = 0
        for k in range(start, stop):
            token = col_token[indices[k]]
            if data[k] > 0 and token >= 0:
                value = ((np.float64(data[k]) / totals[r]) * TARGET_SUM) / col_median[indices[k]]
                neg_values[n] = -value
                tokens[n] = token
                n += 1
        order = _rank_order(neg_values[:n], tokens[:n])
        base = offsets[r]
        for i in range(n_out):
            out[base + i] = tokens[order[i]]


@numba.njit(parallel=True, cache=True)
def fill_padded(flat, offsets, out, first_row, lead):  # pragma: no cover - compiled
    """Copy each cell's tokens from ``flat`` into its row of ``out``.

    Cell i's tokens ``flat[offsets[i]:offsets[i + 1]]`` go to row ``first_row + i``, from
    column ``lead`` on (1 leaves room for ``<cls>``).
    """
    for i in numba.prange(offsets.shape[0] - 1):
        for k in range(offsets[i], offsets[i + 1]):
            out[first_row + i, lead + k - offsets[i]] = flat[k]
