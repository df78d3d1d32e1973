"""Why the gene task is fragile after brief pretraining, and whether freezing or LoRA helps.

Two gene modules (``synthetic_states`` with no state difference: the targets of two drivers
rise and fall with their driver from cell to cell); genes are labelled by module and
classified out of fold (``tl.finetune(task="gene")``), beside the co-expression baseline on
the same folds. Small models from random weights, with or without a short masked-gene
pretraining first, fine-tuned with Geneformer-like fixed settings (lr 1e-3, 1,024-token
batches, 6 epochs), with the defaults (batches sized to the data), with the first layer
frozen, and with LoRA adapters (encoder and embeddings frozen). Each row: out-of-fold AUROC
over seeds (mean ± SD, and the worst single fold). The range test's choice on these data,
1e-2, is a row of its own: before ``lr="auto"`` meant 1e-3 for genes, it was the default.

Run from the repository root: ``python bench/bench_gene_task.py [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np
import torch

import scgeneformer as sgf

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
SETTINGS = {
    "200 cells, 300 genes, 64 tokens": dict(n_cells=200, n_genes=300, length=64),
    "600 cells, 400 genes, 128 tokens": dict(n_cells=600, n_genes=400, length=128),
}
RECIPES = {
    "fixed (lr 1e-3, 1,024-token batches)": dict(lr=1e-3, token_budget=1024),
    "range test (lr 1e-2 here), batches from the data": dict(lr=1e-2),
    "defaults (lr='auto': 1e-3 for genes, batches from the data)": {},
    "defaults, first layer frozen": dict(freeze_layers=1),
    "defaults, LoRA (encoder and embeddings frozen)": dict(adapter="lora"),
}


def modules(n_cells: int, n_genes: int, seed: int):
    adata = sgf.datasets.synthetic_states(
        n_cells=n_cells,
        n_genes=n_genes,
        n_cell_types=1,
        n_drivers=2,
        n_targets_per_driver=20,
        effect_size=0.0,
        random_state=seed,
    )
    driver_of = adata.var["driver_of"]
    first = sorted(set(driver_of[driver_of != ""]))[0]
    labels = {g: "A" if d == first else "B" for g, d in driver_of[driver_of != ""].items()}
    return adata, labels


def encoder(adata, length: int, pretrain_steps: int, seed: int, folder: str) -> sgf.Geneformer:
    vocab = sgf.Vocabulary.build(adata, max_length=length)
    sgf.pp.rank_tokenize(adata, vocab)
    model = sgf.Geneformer.from_config(
        "V1-10M", vocab, random_state=seed, max_position_embeddings=length, **TINY
    )
    if pretrain_steps:
        model = sgf.tl.pretrain(
            adata,
            model,
            output_dir=f"{folder}/pretrain",
            max_steps=pretrain_steps,
            warmup_steps=pretrain_steps // 10,
            token_budget=4096,
            save_every=pretrain_steps,
            log_every=pretrain_steps,
            random_state=seed,
            progress=False,
        )
    # Saved and loaded as a user's pretrained model would be (LoRA records its base folder).
    model.save(f"{folder}/base")
    return sgf.Geneformer.from_pretrained(f"{folder}/base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="the first, smaller data set only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sgf.settings.progress = False
    warnings.simplefilter("ignore")
    print(
        "| data | pretraining | fine-tuning | AUROC, mean ± SD over seeds | worst fold | baseline |"
    )
    print("|---|---|---|---|---|---|")
    settings = list(SETTINGS.items())[: 1 if args.quick else None]
    for name, setting in settings:
        for steps in (0, args.pretrain_steps):
            runs = {recipe: [] for recipe in RECIPES}
            worst = {recipe: [] for recipe in RECIPES}
            baseline = []
            began = time.perf_counter()
            for seed in range(args.seeds):
                adata, labels = modules(setting["n_cells"], setting["n_genes"], seed)
                with tempfile.TemporaryDirectory() as folder:
                    model = encoder(adata, setting["length"], steps, seed, folder)
                    for recipe, kwargs in RECIPES.items():
                        fitted = adata.copy()
                        sgf.tl.finetune(
                            fitted,
                            model,
                            label_key="module",
                            task="gene",
                            gene_labels=labels,
                            n_folds=3,
                            epochs=6,
                            random_state=seed,
                            **kwargs,
                        )
                        result = fitted.uns["module_finetune"]
                        runs[recipe].append(result["auroc"])
                        worst[recipe].append(min(result["folds"]["auroc"]))
                    baseline.append(result["baseline"]["auroc"])
            label = f"{steps} MLM steps" if steps else "none (random weights)"
            for recipe in RECIPES:
                values = np.array(runs[recipe])
                spread = f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
                print(
                    f"| {name} | {label} | {recipe} | {spread} "
                    f"({', '.join(f'{v:.2f}' for v in values)}) | {min(worst[recipe]):.2f} "
                    f"| {np.mean(baseline):.2f} |",
                    flush=True,
                )
            print(f"<!-- {name}, {label}: {time.perf_counter() - began:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
