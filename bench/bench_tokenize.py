"""Benchmark: ``pp.rank_tokenize`` against a plain per-cell numpy implementation.

PBMC 3k (../shared/data) is stacked to at least 50,000 cells and tokenized with the official
V1 and V2 dictionaries, in one process: the reference (per cell: sum duplicates, divide,
``np.argsort``, cut), then ours on one thread and on all cores. Tokens are checked equal.
Times are the best of three runs. Peak memory of each run is the high-water mark of traced
allocations (numpy's included) in a further, traced run, plus for ours the padded uint16 output,
which lives in its own memory map that tracing does not see; that output is most of it.

Run: ``.venv/bin/python bench/bench_tokenize.py [--copies 20] [--reference-cells 5000]``
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

import scgeneformer as sgf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "geneformer_ref"


def reference_tokenize(X: sp.csr_matrix, col_token: np.ndarray, medians: np.ndarray, max_genes):
    """Geneformer's algorithm, one cell at a time, in plain numpy."""
    out = []
    for r in range(X.shape[0]):
        lo, hi = X.indptr[r], X.indptr[r + 1]
        idx, counts = X.indices[lo:hi], X.data[lo:hi].astype(np.float64)
        total = counts.sum()
        tok = col_token[idx]
        keep = tok >= 0
        uniq, inverse = np.unique(tok[keep], return_inverse=True)
        summed = np.bincount(inverse, weights=counts[keep])
        values = ((summed / total) * 10_000) / medians[uniq]
        order = np.lexsort((uniq, -values))[:max_genes]
        out.append(uniq[order])
    return out


def timed(fn, repeats: int = 3):
    """Best of ``repeats`` untraced runs in seconds, then the traced peak of one more run.

    The best run is reported because the others differ mostly by what else the machine did.
    """
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds = min(seconds, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="stack PBMC 3k this many times")
    parser.add_argument(
        "--reference-cells", type=int, default=5000, help="cells the slow reference runs on"
    )
    args = parser.parse_args()
    sgf.settings.progress = False
    pbmc = ad.read_h5ad(SHARED / "data" / "pbmc3k" / "pbmc3k_labelled_counts.h5ad")
    big = ad.concat([pbmc] * args.copies, index_unique="-")
    vocabs = {
        "V1": sgf.Vocabulary.from_geneformer(
            REF / "token_dictionary_gc30M.pkl", REF / "gene_median_dictionary_gc30M.pkl"
        ),
        "V2": sgf.Vocabulary.from_geneformer(
            REF / "token_dictionary_gc95M.pkl",
            REF / "gene_median_dictionary_gc95M.pkl",
            REF / "ensembl_mapping_dict_gc95M.pkl",
        ),
    }
    cores = os.cpu_count() or 1
    print(f"cells: {big.n_obs:,}, genes: {big.n_vars:,}, cores: {cores}")
    print("| dictionary | run | cells | seconds | cells/s | vs reference | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for label, vocab in vocabs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sgf.pp.rank_tokenize(pbmc[:50].copy(), vocab)  # compile the kernels outside timing
            col_token = vocab.tokens_for(big.var_names)
            subset = sp.csr_matrix(big.X[: args.reference_cells])
            ref_tokens, ref_s, ref_peak = timed(
                lambda s=subset, c=col_token, v=vocab: reference_tokenize(
                    s, c, v.median_by_token, v.max_genes
                )
            )
            ref_rate = len(ref_tokens) / ref_s
            print(
                f"| {label} | per-cell numpy reference | {len(ref_tokens):,} | {ref_s:.2f} "
                f"| {ref_rate:,.0f} | 1.0x | {ref_peak:,.0f} |"
            )
            for n_jobs in (1, cores):
                _, s, peak = timed(lambda j=n_jobs, v=vocab: sgf.pp.rank_tokenize(big, v, n_jobs=j))
                peak += big.obsm["geneformer_tokens"].nbytes / 2**20
                rate = big.n_obs / s
                print(
                    f"| {label} | rank_tokenize, {n_jobs} thread(s) | {big.n_obs:,} | {s:.2f} "
                    f"| {rate:,.0f} | {rate / ref_rate:.1f}x | {peak:,.0f} |"
                )
        tokens = big.obsm["geneformer_tokens"]
        n = big.obs["geneformer_n_tokens"].to_numpy()
        lead = 1 if vocab.has_cls else 0
        for r, expected in enumerate(ref_tokens):
            got = tokens[r, lead : n[r] - lead]
            if not np.array_equal(got, expected):
                raise SystemExit(f"{label}: cell {r} differs from the reference")
    print("tokens equal the reference on every reference cell")


if __name__ == "__main__":
    main()
