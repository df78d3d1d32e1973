"""Exact non-zero medians of CP10k-normalised counts over a corpus that need not fit in memory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._genes import gene_names, normalize_gene_id
from .._progress import progress_bar
from ._chunks import count_source, iter_csr_chunks, shared_columns
from ._median_kernel import place_cp10k, stretch_medians
from ._rank_kernel import row_totals_checked

CorpusItem = AnnData | str | os.PathLike


def _as_items(data: CorpusItem | Iterable[CorpusItem]) -> list[CorpusItem]:
    if isinstance(data, AnnData | str | os.PathLike):
        return [data]
    items = list(data)
    if not items:
        raise ValueError("The corpus is empty: give at least one AnnData or h5ad path.")
    return items


@contextmanager
def open_corpus_item(item: CorpusItem) -> Iterator[AnnData]:
    """Yield an AnnData for ``item``; an h5ad path is opened backed and closed afterwards."""
    if isinstance(item, AnnData):
        yield item
        return
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file {str(path)!r} does not exist.")
    adata = ad.read_h5ad(path, backed="r")
    try:
        yield adata
    finally:
        adata.file.close()


def _column_genes(
    adata: AnnData, gene_key: str | None, mapping: Mapping[str, str] | None, index: dict[str, int]
) -> np.ndarray:
    """Global gene index of each column, adding genes not seen before to ``index``."""
    lookup = {} if mapping is None else {normalize_gene_id(k): v for k, v in mapping.items()}
    out = np.empty(adata.n_vars, dtype=np.int64)
    for j, name in enumerate(gene_names(adata, gene_key)):
        key = normalize_gene_id(name)
        gene = normalize_gene_id(lookup.get(key, key))
        out[j] = index.setdefault(gene, len(index))
    return out


def _checked_totals(chunk: sp.csr_matrix, item_label: str) -> np.ndarray:
    """Row totals of a chunk of raw counts; raises on anything else."""
    totals, bad_code, bad_value = row_totals_checked(chunk)
    if bad_code.any():
        row = int(np.flatnonzero(bad_code)[0])
        raise ValueError(
            f"{item_label} holds {float(bad_value[row])!r}: Vocabulary.build needs raw counts "
            "(finite, non-negative integers); pass layer= if they are in a layer."
        )
    return totals


def corpus_nonzero_medians(
    data: CorpusItem | Iterable[CorpusItem],
    *,
    layer: str | None,
    gene_key: str | None,
    mapping: Mapping[str, str] | None,
    min_cells: int,
    chunk_size: int,
    tmp_dir: str | os.PathLike | None,
) -> tuple[list[str], np.ndarray]:
    """Genes expressed in at least ``min_cells`` cells, sorted by ID, and their exact medians.

    A gene's median is ``numpy.median`` of its non-zero values of ``count / total * 10,000``
    over all cells. Three streamed passes: count each gene's non-zero cells; write the values
    into a memory-mapped file, gene by gene; take each gene's median from its stretch.
    """
    items = _as_items(data)
    if min_cells < 1:
        raise ValueError(f"min_cells must be at least 1, got {min_cells}.")
    index: dict[str, int] = {}
    plans = []
    for item in items:
        with open_corpus_item(item) as adata:
            column_gene = _column_genes(adata, gene_key, mapping, index)
            plans.append((column_gene, *shared_columns(column_gene)))
            count_source(adata, layer)  # fail early on a missing layer
    labels = [
        f"Corpus item {i} ({'an AnnData' if isinstance(item, AnnData) else str(item)!r})"
        for i, item in enumerate(items)
    ]
    ones = np.ones(len(index), dtype=np.float64)

    def chunks(desc: str):
        """Each chunk of each item, with the item's column plan and label."""
        for item, plan, label in zip(items, plans, labels, strict=True):
            with open_corpus_item(item) as adata:
                source = count_source(adata, layer)
                bar = progress_bar(total=source.n_rows, desc=desc, unit="cells")
                with bar:
                    for _, chunk in iter_csr_chunks(source, chunk_size):
                        yield chunk, plan, label
                        bar.update(chunk.shape[0])

    n_nonzero = np.zeros(len(index), dtype=np.int64)
    nowhere = np.empty(0, dtype=np.float64)
    for chunk, plan, label in chunks("Vocabulary.build: counting"):
        totals = _checked_totals(chunk, label)
        place_cp10k(
            chunk.indptr, chunk.indices, chunk.data, *plan, ones, totals, n_nonzero, nowhere
        )
    if n_nonzero.sum() == 0:
        raise ValueError("The corpus holds no non-zero counts.")

    starts = np.concatenate([[0], np.cumsum(n_nonzero)[:-1]])
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="sgf_medians_") as folder:
        spill = np.lib.format.open_memmap(
            Path(folder) / "values.npy", mode="w+", dtype=np.float64, shape=(int(n_nonzero.sum()),)
        )
        values = np.asarray(spill)  # a plain ndarray over the same mapped memory
        cursor = starts.copy()
        for chunk, plan, label in chunks("Vocabulary.build: collecting"):
            totals = _checked_totals(chunk, label)
            place_cp10k(
                chunk.indptr, chunk.indices, chunk.data, *plan, ones, totals, cursor, values
            )
        names = np.array(list(index), dtype=object)
        keep = np.flatnonzero(n_nonzero >= min_cells)
        keep = keep[np.argsort(names[keep])]
        medians = stretch_medians(values, starts, n_nonzero, keep)
        del values, spill
    if len(keep) == 0:
        raise ValueError(f"No gene is expressed in at least min_cells={min_cells} cells.")
    return names[keep].tolist(), medians
