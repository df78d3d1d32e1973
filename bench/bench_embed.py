"""Benchmark: ``tl.embed`` against transformers on the same weights and the same cells.

V1-10M (random weights, the official config) embeds PBMC 3k cells tokenized with the official
V1 dictionary (mean about 830 genes per cell). The references are ``BertForMaskedLM`` run as
Geneformer's embedding extractor runs it (eager attention, fp32, cells sorted by length and
padded per batch of 100, all hidden states returned, mean over the non-pad tokens of the
second-to-last layer), then the same with SDPA attention, and with bfloat16 autocast where the
device supports it (see ``bench/_reference.py``). Every model, ours included, is in memory
before its timer starts, and each run is warmed up on two cells first. All run in this
process; the embeddings are compared with ours.

Run: ``.venv/bin/python bench/bench_embed.py [--cells 200] [--batch 100]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import _reference
import anndata as ad
import numpy as np
import torch

import scgeneformer as sgf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "geneformer_ref"


def reference_embed(
    model, reference, tokens: np.ndarray, n_tokens: np.ndarray, batch: int
) -> np.ndarray:
    """Cells sorted by length (longest first), each batch padded to its own longest cell."""
    order = np.argsort(-n_tokens, kind="stable")
    out = np.empty((len(order), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad(), _reference.precision(reference, model.device):
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            width = int(n_tokens[rows].max())
            ids = torch.as_tensor(tokens[rows, :width].astype(np.int64), device=model.device)
            mask = ids != 0
            states = model(ids, attention_mask=mask.long(), output_hidden_states=True)
            h = states.hidden_states[-2].float()
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out[rows] = pooled.cpu().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100, help="reference batch (Geneformer: 100)")
    args = parser.parse_args()
    sgf.settings.progress = False
    pbmc = ad.read_h5ad(SHARED / "data" / "pbmc3k" / "pbmc3k_labelled_counts.h5ad")
    cells = pbmc[: args.cells].copy()
    vocab = sgf.Vocabulary.from_geneformer(
        REF / "token_dictionary_gc30M.pkl", REF / "gene_median_dictionary_gc30M.pkl"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sgf.pp.rank_tokenize(cells, vocab)
    tokens = cells.obsm["geneformer_tokens"]
    n_tokens = cells.obs["geneformer_n_tokens"].to_numpy()
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"V1-10M, {len(n_tokens)} PBMC cells, mean {n_tokens.mean():.0f} tokens")
    print(_reference.machine())

    sgf.tl.embed(cells[:2].copy(), model, device=device)  # warm-up
    start = time.perf_counter()
    sgf.tl.embed(cells, model, device=device)
    ours_s = time.perf_counter() - start
    ours = cells.obsm["X_geneformer"]

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        for reference in _reference.references(device):
            hf = _reference.load(folder, reference, device)
            reference_embed(hf, reference, tokens[:2], n_tokens[:2], args.batch)  # warm-up
            start = time.perf_counter()
            expected = reference_embed(hf, reference, tokens, n_tokens, args.batch)
            seconds = time.perf_counter() - start
            error = np.abs(ours - expected).max() / np.abs(expected).max()
            rows.append((reference.label, seconds, error))
    first = rows[0][1]
    print("| run | seconds | cells/s | vs Geneformer's settings | max rel. difference |")
    print("|---|---|---|---|---|")
    for label, seconds, error in rows:
        print(
            f"| {label}, cells sorted by length, batches of {args.batch} | {seconds:.1f} "
            f"| {len(n_tokens) / seconds:.1f} | {first / seconds:.1f}x | {error:.1e} |"
        )
    best = min(seconds for _, seconds, _ in rows)
    print(
        f"| sgf.tl.embed (length-bucketed SDPA, fp32, stops at the layer read) | {ours_s:.1f} "
        f"| {len(n_tokens) / ours_s:.1f} | {first / ours_s:.1f}x | - |"
    )
    print(f"sgf.tl.embed vs the fastest reference: {best / ours_s:.1f}x")


if __name__ == "__main__":
    main()
