"""Ranking raw counts chunk by chunk into gene tokens: the loop shared by every tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._settings import settings
from ..vocab import Vocabulary
from ._chunks import CountSource, iter_csr_chunks
from ._gene_plan import GenePlan
from ._rank_kernel import BAD_NEGATIVE, BAD_NONFINITE, announce_first_use, rank_rows, scan_rows


@dataclass(frozen=True)
class RankedChunk:
    """Gene tokens of a block of cells: ``flat[offsets[i]:offsets[i + 1]]`` for cell i."""

    offsets: np.ndarray
    flat: np.ndarray

    @property
    def n_gene_tokens(self) -> np.ndarray:
        """Gene tokens per cell (special tokens not counted)."""
        return np.diff(self.offsets)


@contextmanager
def numba_threads(n_jobs: int | None):
    """Run numba's parallel loops on ``n_jobs`` threads (default: the setting)."""
    wanted = settings.n_jobs if n_jobs is None else n_jobs
    wanted = max(1, min(int(wanted), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(wanted)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def token_dtype(vocab: Vocabulary) -> np.dtype:
    """uint16 when every token id fits, int32 otherwise."""
    return np.dtype(np.uint16) if vocab.size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _raise_bad_counts(
    source: CountSource, code: np.ndarray, value: np.ndarray, cell_names: pd.Index, start: int
) -> None:
    row = int(np.flatnonzero(code)[0])
    bad, cell = float(value[row]), cell_names[start + row]
    where = f"{source.label} holds {bad!r} in cell {cell!r}"
    if code[row] == BAD_NONFINITE:
        raise ValueError(f"{where}: counts must be finite. Fix or remove such cells first.")
    what = "negative values" if code[row] == BAD_NEGATIVE else "non-integer values"
    hint = (
        "as scaled data does"
        if code[row] == BAD_NEGATIVE
        else "as log-normalised or normalised data does"
    )
    raise ValueError(
        f"{where}: {what}, {hint}. rank_tokenize needs raw counts; if they are in a layer, "
        "pass layer='counts' (or that layer's name)."
    )


def rank_chunk(
    chunk: sp.csr_matrix,
    plan: GenePlan,
    max_genes: int,
    dtype: np.dtype,
    totals: np.ndarray | None = None,
) -> tuple[RankedChunk, np.ndarray, np.ndarray]:
    """Rank one CSR chunk of raw counts; checks counts on the way.

    Returns the ranked tokens and, for error reporting, the per-row bad-value code and value.
    ``totals`` overrides the cell totals (default: the sum over all genes of each cell).
    """
    announce_first_use()
    row_sums, bad_code, bad_value, counts = scan_rows(
        chunk.indptr,
        chunk.indices,
        chunk.data,
        plan.column_token,
        plan.column_shared,
        len(plan.shared_token),
        max_genes,
    )
    if bad_code.any():
        return RankedChunk(np.zeros(1, np.int64), np.empty(0, dtype)), bad_code, bad_value
    totals = row_sums if totals is None else np.asarray(totals, dtype=np.float64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = np.empty(offsets[-1], dtype=dtype)
    rank_rows(
        chunk.indptr,
        chunk.indices,
        chunk.data,
        plan.column_token,
        plan.column_shared,
        plan.shared_token,
        plan.median_by_token,
        totals,
        offsets,
        flat,
    )
    return RankedChunk(offsets, flat), bad_code, bad_value


def iter_ranked_chunks(
    source: CountSource,
    plan: GenePlan,
    max_genes: int,
    dtype: np.dtype,
    cell_names: pd.Index,
    *,
    chunk_size: int,
    totals: np.ndarray | None = None,
) -> Iterator[tuple[int, int, RankedChunk]]:
    """Rank the cells of ``source`` chunk by chunk: ``(first row, rows, ranked tokens)``.

    The one loop that both :func:`scgeneformer.pp.rank_tokenize` and the token-store writer
    run. Counts are checked on the way; a bad value raises, naming the cell.
    """
    for start, chunk in iter_csr_chunks(source, chunk_size):
        chunk_totals = None if totals is None else totals[start : start + chunk.shape[0]]
        ranked, bad_code, bad_value = rank_chunk(chunk, plan, max_genes, dtype, chunk_totals)
        if bad_code.any():
            _raise_bad_counts(source, bad_code, bad_value, cell_names, start)
        yield start, chunk.shape[0], ranked
