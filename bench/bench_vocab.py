"""Benchmark: ``Vocabulary.build`` (streamed, exact medians) against in-memory numpy.

PBMC 3k (../shared/data) stacked to 52,760 cells. The reference holds the whole matrix in
memory: CP10k-normalise the CSR rows, convert to CSC, ``numpy.median`` of each gene's non-zero
values; numpy and scipy run these on one thread. Ours streams row chunks through numba
kernels into a memory-mapped file, so the corpus never has to fit in memory; its kernels are
parallel, so it runs twice in this process, on one numba thread (like for like with the
reference) and on all of them. Medians are checked equal bit for bit.

Run: ``.venv/bin/python bench/bench_vocab.py [--copies 20]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _reference
import anndata as ad
import numba
import numpy as np
import scipy.sparse as sp

import scgeneformer as sgf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def reference_medians(X: sp.csr_matrix) -> np.ndarray:
    """Each gene's median non-zero CP10k value (NaN where never expressed), all in memory."""
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    cp10k = sp.csr_matrix(X, dtype=np.float64)
    cp10k.data = (cp10k.data / np.repeat(totals, np.diff(cp10k.indptr))) * 10_000
    cp10k.eliminate_zeros()
    by_gene = cp10k.tocsc()
    out = np.full(X.shape[1], np.nan)
    for j in range(X.shape[1]):
        values = by_gene.data[by_gene.indptr[j] : by_gene.indptr[j + 1]]
        if len(values):
            out[j] = np.median(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="stack PBMC 3k this many times")
    args = parser.parse_args()
    sgf.settings.progress = False
    pbmc = ad.read_h5ad(SHARED / "data" / "pbmc3k" / "pbmc3k_labelled_counts.h5ad")
    big = ad.concat([pbmc] * args.copies, index_unique="-")
    sgf.Vocabulary.build(pbmc[:50].copy())  # compile the kernels outside timing

    start = time.perf_counter()
    expected = reference_medians(big.X)
    ref_s = time.perf_counter() - start
    threads = numba.get_num_threads()
    ours = {}
    for n in sorted({1, threads}):
        numba.set_num_threads(n)
        start = time.perf_counter()
        vocab = sgf.Vocabulary.build(big)
        ours[n] = time.perf_counter() - start
        column = {g: j for j, g in enumerate(big.var_names)}
        for gene, token in vocab.token_dict.items():
            if vocab.median_by_token[token] != expected[column[gene]]:
                raise SystemExit(f"{gene}: median differs from the reference")
    numba.set_num_threads(threads)
    print(f"cells: {big.n_obs:,}, genes with a median: {vocab.n_genes:,}")
    print(_reference.machine())
    print("| run | threads | seconds | cells/s | vs reference |")
    print("|---|---|---|---|---|")
    print(f"| numpy, whole matrix in memory | 1 | {ref_s:.2f} | {big.n_obs / ref_s:,.0f} | 1.0x |")
    for n, seconds in ours.items():
        print(
            f"| Vocabulary.build, streamed | {n} | {seconds:.2f} | {big.n_obs / seconds:,.0f} "
            f"| {ref_s / seconds:.1f}x |"
        )
    print("medians equal the reference bit for bit")


if __name__ == "__main__":
    main()
