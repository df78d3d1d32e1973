"""Benchmark: ``tl.embed`` on the CPU against transformers run the way Geneformer runs it.

V1-10M (random weights, the official config) embeds PBMC 3k cells tokenized with the official
V1 dictionary (mean about 830 genes per cell). The reference is ``BertForMaskedLM`` in fp32
with eager attention on padded batches of 100 cells, all hidden states returned, mean over the
non-pad tokens of the second-to-last layer, as Geneformer's embedding extractor does. Both run
in this process; the embeddings are checked equal.

Run: ``.venv/bin/python bench/bench_embed.py [--cells 200]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import scgeneformer as sgf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "geneformer_ref"


def reference_embed(folder: Path, tokens: np.ndarray, n_tokens: np.ndarray, batch: int = 100):
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch):
            ids = torch.as_tensor(tokens[start : start + batch].astype(np.int64))
            mask = ids != 0
            states = model(ids, attention_mask=mask.long(), output_hidden_states=True)
            h = states.hidden_states[-2]
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
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
    print(
        f"V1-10M, {len(n_tokens)} PBMC cells, mean {n_tokens.mean():.0f} tokens, CPU fp32, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        start = time.perf_counter()
        expected = reference_embed(Path(folder), tokens, n_tokens)
        ref_s = time.perf_counter() - start
    start = time.perf_counter()
    sgf.tl.embed(cells, model, layer=-1)
    ours_s = time.perf_counter() - start
    error = np.abs(cells.obsm["X_geneformer"] - expected).max() / np.abs(expected).max()
    print("| run | seconds | cells/s | vs reference |")
    print("|---|---|---|---|")
    print(
        f"| transformers, fp32 eager, padded batches of 100 | {ref_s:.1f} "
        f"| {len(n_tokens) / ref_s:.1f} | 1.0x |"
    )
    print(
        f"| sgf.tl.embed (length-bucketed SDPA, stops at the layer read) | {ours_s:.1f} "
        f"| {len(n_tokens) / ours_s:.1f} | {ref_s / ours_s:.1f}x |"
    )
    print(f"max relative difference of the embeddings: {error:.1e}")


if __name__ == "__main__":
    main()
