"""Numba kernels for rank-value tokenization over CSR rows.

Geneformer's rank value of gene g in cell c is ``((count / total) * 10_000) / median[g]``,
evaluated in float64 in that order so that the ordering matches its numpy code bit for bit.
Genes are ordered by value, highest first; exact ties go to the smaller token id, which makes
the order independent of gene column order and identical on every machine.

Columns that map to the same vocabulary gene (``col_shared[j] >= 0``) are summed inside the
kernels, per row, into a small table indexed by that shared slot.
"""

from __future__ import annotations

import sys

import numba
import numpy as np

TARGET_SUM = 10_000.0

# Codes for the first problem met in a row's values (0: none).
BAD_NONFINITE, BAD_NEGATIVE, BAD_NONINTEGER = 1, 2, 3

# Rows per parallel work item: scratch arrays are allocated once per block, not per row.
BLOCK_ROWS = 64

# Moves per entry the insertion fix-up may make before a row is merge-sorted instead.
MOVES_PER_ENTRY = 8

_LOW32 = np.uint64(0xFFFFFFFF)
_BYTE = np.uint64(255)


@numba.njit(inline="always")
def _problem_code(value):  # pragma: no cover - compiled
    """0 for a finite non-negative integer, else the code of what is wrong with it."""
    if not np.isfinite(value):
        return BAD_NONFINITE
    if value < 0.0:
        return BAD_NEGATIVE
    if value != np.floor(value):
        return BAD_NONINTEGER
    return 0


@numba.njit(parallel=True, cache=True)
def scan_rows(
    indptr, indices, data, col_token, col_shared, n_shared, max_genes
):  # pragma: no cover - compiled
    """One pass over each row: its total, its first non-count value, its number of tokens.

    Returns ``(totals, bad_code, bad_value, n_genes)``: ``totals[r]`` is row r's sum in
    float64; ``bad_code[r]`` is 0 when the row holds only finite non-negative integers, else
    the code of the first other value, ``bad_value[r]``; ``n_genes[r]`` counts the row's
    expressed vocabulary genes, columns sharing a token (``col_shared[j] >= 0``) once, capped
    at ``max_genes``.
    """
    n_rows = indptr.shape[0] - 1
    totals = np.zeros(n_rows, dtype=np.float64)
    bad_code = np.zeros(n_rows, dtype=np.int8)
    bad_value = np.zeros(n_rows, dtype=np.float64)
    n_genes = np.zeros(n_rows, dtype=np.int64)
    for block in numba.prange((n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS):
        seen = np.zeros(max(n_shared, 1), dtype=np.bool_)
        touched = np.empty(max(n_shared, 1), dtype=np.int64)
        for r in range(block * BLOCK_ROWS, min((block + 1) * BLOCK_ROWS, n_rows)):
            acc, n, n_touched = 0.0, 0, 0
            for k in range(indptr[r], indptr[r + 1]):
                v = np.float64(data[k])
                code = _problem_code(v)
                if code != 0:
                    bad_code[r] = code
                    bad_value[r] = v
                    break
                acc += v
                j = indices[k]
                if v > 0 and col_token[j] >= 0:
                    slot = col_shared[j]
                    if slot < 0:
                        n += 1
                    elif not seen[slot]:
                        seen[slot] = True
                        touched[n_touched] = slot
                        n_touched += 1
            for i in range(n_touched):
                seen[touched[i]] = False
            totals[r] = acc
            n_genes[r] = min(n + n_touched, max_genes)
    return totals, bad_code, bad_value, n_genes


def _kernels_compiled() -> bool:
    return bool(scan_rows.signatures or rank_rows.signatures)


def announce_first_use() -> None:
    """Say, once per process, that the kernels compile before their first call.

    Numba compiles them on first use after installation (then loads them from its cache), so
    the first tokenization pauses for a while; one line on stderr says why.
    """
    if _kernels_compiled() or getattr(announce_first_use, "done", False):
        return
    announce_first_use.done = True
    from tqdm.auto import tqdm

    from .._settings import settings

    if settings.progress:  # through tqdm, so that it does not break a progress bar's line
        tqdm.write(
            "scgeneformer: preparing the tokenizer's numba kernels (compiled on first use "
            "after installation, then cached) ...",
            file=sys.stderr,
        )


def row_totals_checked(chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row sums and count checks of a CSR matrix: :func:`scan_rows` with no vocabulary.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> totals, bad_code, _ = row_totals_checked(sp.csr_matrix(np.array([[1.0, 2.0], [0.5, 0]])))
    >>> totals.tolist(), bad_code.tolist()
    ([3.0, 0.0], [0, 3])
    """
    announce_first_use()
    no_tokens = np.full(chunk.shape[1], -1, dtype=np.int64)
    totals, bad_code, bad_value, _ = scan_rows(
        chunk.indptr, chunk.indices, chunk.data, no_tokens, no_tokens, 0, 0
    )
    return totals, bad_code, bad_value


@numba.njit(cache=True)
def _rank_order(values, tokens, n, packed, spare, histogram):  # pragma: no cover
    """Order the first ``n`` entries by rank: value descending, then token id ascending.

    A least-significant-digit radix sort puts the entries in order up to a coarse key: the
    float32 bit pattern of each value (which orders positive floats), less the row's
    smallest, shifted right until the row's span fits in 16 bits, so two byte passes
    suffice. Key and entry index travel packed in one uint64. An insertion pass with exact
    float64 comparisons and the token tie rule then orders the few neighbours the coarse key
    could not tell apart. Returns a view of ``packed`` or ``spare``.
    """
    lowest, highest = np.uint32(0xFFFFFFFF), np.uint32(0)
    for i in range(n):
        # Inverting the bits of a positive float32 orders the values descending.
        key = ~np.float32(values[i]).view(np.uint32)
        packed[i] = key
        lowest, highest = min(lowest, key), max(highest, key)
    shift = np.uint32(0)
    while ((highest - lowest) >> shift) > 0xFFFF:
        shift += np.uint32(1)
    histogram[:, :] = 0
    for i in range(n):
        key = (np.uint32(packed[i]) - lowest) >> shift
        packed[i] = (np.uint64(key) << np.uint64(32)) | np.uint64(i)
        histogram[0, key & 255] += 1
        histogram[1, key >> 8] += 1
    source, target = packed, spare
    for digit in range(2):
        bit = np.uint64(32 + 8 * digit)
        if histogram[digit, (source[0] >> bit) & _BYTE] == n:
            continue
        running = 0
        for b in range(256):
            count = histogram[digit, b]
            histogram[digit, b] = running
            running += count
        for i in range(n):
            item = source[i]
            b = (item >> bit) & _BYTE
            target[histogram[digit, b]] = item
            histogram[digit, b] += 1
        source, target = target, source
    order = source[:n]
    for i in range(n):
        order[i] &= _LOW32
    # Entries with different coarse keys are in order already; the insertion pass orders each
    # run of one key exactly. Long runs of exact ties (genes sharing a median and a count)
    # would make it quadratic: past a budget of moves the whole row is merge-sorted instead.
    # Written out in full: a helper call per entry here measured twice as slow.
    moves, budget = 0, MOVES_PER_ENTRY * n
    for p in range(1, n):
        entry = order[p]
        value, token = values[entry], tokens[entry]
        q = p - 1
        while q >= 0 and (
            values[order[q]] < value or (values[order[q]] == value and tokens[order[q]] > token)
        ):
            order[q + 1] = order[q]
            q -= 1
        moves += p - 1 - q
        order[q + 1] = entry
        if moves > budget:
            _sort_run(order, values, tokens)
            break
    return order


@numba.njit(cache=True)
def _sort_run(run, values, tokens):  # pragma: no cover - compiled
    """Order entries in place by value descending, then token id ascending, in n log n."""
    by_token = run[np.argsort(tokens[run], kind="mergesort")]
    run[:] = by_token[np.argsort(-values[by_token], kind="mergesort")]


@numba.njit(inline="always")
def gather_row(
    start,
    stop,
    indices,
    data,
    col_key,
    col_shared,
    shared_key,
    median_by_key,
    total,
    shared_sum,
    touched,
    keys,
    values,
):  # pragma: no cover - compiled
    """Collect one CSR row's expressed, keyed entries ``start:stop`` with their rank values.

    Writes ``keys[i]`` and ``values[i] = ((count / total) * 10_000) / median_by_key[key]``
    (a median of 1 gives the CP10k value itself, exactly). Columns with ``col_key[j] < 0``
    or a zero count are skipped; columns that share a key (``col_shared[j] = s >= 0``, key
    ``shared_key[s]``) are summed first, in ``shared_sum`` (all zeros on entry and on return)
    with ``touched`` as scratch, and come after the others. Returns the number written.
    """
    n, n_touched = 0, 0
    for k in range(start, stop):
        j = indices[k]
        count = np.float64(data[k])
        if count <= 0 or col_key[j] < 0:
            continue
        slot = col_shared[j]
        if slot >= 0:
            if shared_sum[slot] == 0:
                touched[n_touched] = slot
                n_touched += 1
            shared_sum[slot] += count
            continue
        keys[n] = col_key[j]
        values[n] = ((count / total) * TARGET_SUM) / median_by_key[col_key[j]]
        n += 1
    for i in range(n_touched):
        slot = touched[i]
        keys[n] = shared_key[slot]
        values[n] = ((shared_sum[slot] / total) * TARGET_SUM) / median_by_key[shared_key[slot]]
        shared_sum[slot] = 0.0
        n += 1
    return n


@numba.njit(parallel=True, cache=True)
def rank_rows(
    indptr,
    indices,
    data,
    col_token,
    col_shared,
    shared_token,
    median_by_token,
    totals,
    offsets,
    out,
):  # pragma: no cover - compiled
    """Write each row's top-ranked gene tokens into ``out[offsets[r]:offsets[r + 1]]``.

    ``col_token[j]`` is column j's token id (-1 outside the vocabulary); columns with
    ``col_shared[j] = s >= 0`` share token ``shared_token[s]`` with other columns and are
    summed first (see :func:`gather_row`). ``median_by_token`` holds each token's median.
    """
    n_rows = indptr.shape[0] - 1
    n_shared = shared_token.shape[0]
    for block in numba.prange((n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS):
        first, stop = block * BLOCK_ROWS, min((block + 1) * BLOCK_ROWS, n_rows)
        width = 1
        for r in range(first, stop):
            width = max(width, indptr[r + 1] - indptr[r])
        tokens = np.empty(width, dtype=np.int64)
        values = np.empty(width, dtype=np.float64)
        packed = np.empty(width, dtype=np.uint64)
        spare = np.empty(width, dtype=np.uint64)
        histogram = np.empty((2, 256), dtype=np.int64)
        shared_sum = np.zeros(max(n_shared, 1), dtype=np.float64)
        touched = np.empty(max(n_shared, 1), dtype=np.int64)
        for r in range(first, stop):
            n_out = offsets[r + 1] - offsets[r]
            if n_out == 0:
                continue
            n = gather_row(
                indptr[r],
                indptr[r + 1],
                indices,
                data,
                col_token,
                col_shared,
                shared_token,
                median_by_token,
                totals[r],
                shared_sum,
                touched,
                tokens,
                values,
            )
            order = _rank_order(values, tokens, n, packed, spare, histogram)
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
        # A slice copy: an element loop here measured ten times slower on two threads.
        n = offsets[i + 1] - offsets[i]
        out[first_row + i, lead : lead + n] = flat[offsets[i] : offsets[i + 1]]
