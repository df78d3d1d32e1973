"""Cross-validated fine-tuning beside PCA + logistic regression, and a short search vs defaults.

Run from the repository root: ``python bench/bench_finetune.py [--out bench/figures]``. Small
models trained from random weights on the CPU; the figures say what the defaults and the
search do on small data, not what a pretrained Geneformer reaches.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import matplotlib
import torch

import scgeneformer as sgf

matplotlib.use("Agg")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)


def tiny(vocab: sgf.Vocabulary) -> sgf.Geneformer:
    return sgf.Geneformer.from_config(
        "V1-10M", vocab, random_state=0, max_position_embeddings=vocab.max_length, **TINY
    )


def line(name: str, result: dict) -> str:
    base = result["baseline"]
    return (
        f"{name}: Geneformer macro-F1 {result['macro_f1']:.3f} ± {result['macro_f1_sd']:.3f} "
        f"(splits {', '.join(f'{v:.2f}' for v in result['splits']['macro_f1'])}); "
        f"PCA + LR {base['macro_f1']:.3f} ± {base['macro_f1_sd']:.3f} "
        f"(splits {', '.join(f'{v:.2f}' for v in base['splits']['macro_f1'])})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/figures")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    sgf.settings.progress = False
    warnings.simplefilter("ignore")

    synthetic = sgf.datasets.synthetic_states(n_cells=600, n_genes=400, n_donors=6, random_state=0)
    vocab = sgf.Vocabulary.build(synthetic, max_length=256)
    t = time.time()
    sgf.tl.finetune(synthetic, tiny(vocab), label_key="state", group_key="donor", n_splits=5)
    print(
        line(
            "synthetic_states, 600 cells, 6 donors, 5 splits by donor",
            synthetic.uns["state_finetune"],
        ),
        f"[{time.time() - t:.0f} s]",
        flush=True,
    )
    sgf.pl.finetune_splits(synthetic, "state", save=out / "cv_synthetic.png", show=False)

    pbmc_path = SHARED / "data" / "pbmc3k" / "pbmc3k_labelled_counts.h5ad"
    if pbmc_path.exists():
        pbmc = ad.read_h5ad(pbmc_path)
        pvocab = sgf.Vocabulary.build(pbmc, min_cells=20, max_length=64, name="pbmc3k")
        sgf.pp.rank_tokenize(pbmc, pvocab)
        t = time.time()
        sgf.tl.finetune(pbmc, tiny(pvocab), label_key="cell_type", n_splits=5, epochs=5)
        print(
            line(
                "PBMC 3k, 9 cell types, 64 tokens, 5 stratified splits, 5 epochs",
                pbmc.uns["cell_type_finetune"],
            ),
            f"[{time.time() - t:.0f} s]",
            flush=True,
        )
        sgf.pl.finetune_splits(pbmc, "cell_type", save=out / "cv_pbmc3k.png", show=False)

    # A short search against the defaults, on the same split by donor; Geneformer's recipe
    # (lr 5e-5) beside them.
    base = sgf.datasets.synthetic_states(n_cells=600, n_genes=400, n_donors=6, random_state=1)
    runs = {}
    for name, kwargs in (("default (lr='auto')", {}), ("Geneformer's lr 5e-5", {"lr": 5e-5})):
        adata = base.copy()
        clf = sgf.tl.finetune(
            adata, tiny(vocab), label_key="state", group_key="donor", val_size=0.2, **kwargs
        )
        best = max(record["macro_f1"] for record in clf.history["eval"])
        runs[name] = (best, adata.uns["state_finetune"]["macro_f1"])
    tuned = base.copy()
    t = time.time()
    clf = sgf.tl.tune_finetune(
        tuned,
        tiny(vocab),
        label_key="state",
        group_key="donor",
        n_trials=args.trials,
        search_space={
            "lr": (1e-5, 1e-2, "log"),
            "warmup_fraction": (0.0, 0.3),
            "weight_decay": (1e-4, 1e-1, "log"),
            "epochs": (3, 10),
            "freeze_layers": [0, 1],
        },
    )
    runs[f"search, {args.trials} trials"] = (
        tuned.uns["state_tune"]["best_value"],
        tuned.uns["state_finetune"]["macro_f1"],
    )
    print(f"search took {time.time() - t:.0f} s; best {tuned.uns['state_tune']['best_params']}")
    for name, (val, test) in runs.items():
        print(f"{name}: validation macro-F1 {val:.3f}, held-out donors macro-F1 {test:.3f}")
    baseline = tuned.uns["state_finetune"]["baseline"]["macro_f1"]
    print(f"PCA + LR on the held-out donors: {baseline:.3f}")
    sgf.pl.tune_trials(tuned, "state", save=out / "search_synthetic.png", show=False)


if __name__ == "__main__":
    main()
