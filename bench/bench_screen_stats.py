"""Benchmark: are a screen's p-values and FDRs calibrated, and do they find what is planted?

Three measurements, each printed as a table (the figures of bench/RESULTS.md):

1. Calibration: cells of one state split at random into two fake states (several seeds), a
   deletion screen from one toward the other, for each ``alternative``: the share of genes at
   FDR < 0.05 (should be at most about 5%) and the Kolmogorov-Smirnov distance of the
   p-values from uniform. Once with a random-weight model, once with the encoder fine-tuned
   in part 2 (a model that knows states, on cells that have none).
2. Power: ``synthetic_states`` with a state classifier fine-tuned from scratch, deletion from
   disease toward healthy: the share of planted drivers and of neutral genes at FDR < 0.05,
   the smallest FDR and the floor the cell count sets, beside Geneformer's
   ``goal_state_shift`` (``sgf.tl.perturbation_stats``) on the same per-cell shifts.
3. Kang 2018 (if ../shared is present): the interferon genes' FDRs after fine-tuning on
   stimulated vs control cells, deletion from stim toward ctrl, and a short list of three
   interferon genes tested against background genes.

Run: ``.venv/bin/python bench/bench_screen_stats.py [--seeds 5] [--parts calibration power kang]``
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats

import scgeneformer as sgf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KANG = SHARED / "data" / "kang2018_ifnb" / "kang2018_harmony_ctrl_stim.h5ad"
ALTERNATIVES = ("greater", "less", "two-sided")
ISGS = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "ISG20", "IFITM3"]
SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
)


def markdown(table: pd.DataFrame, index: bool = False) -> str:
    """A pipe table of ``table`` with numbers to four significant digits."""
    table = table.reset_index() if index else table
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.values]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * table.shape[1]]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def fine_tune(adata: ad.AnnData, label_key: str, epochs: int):
    vocab = sgf.Vocabulary.build(adata, max_length=256, min_cells=10)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **SMALL)
    clf = sgf.tl.finetune(
        adata,
        model,
        label_key=label_key,
        epochs=epochs,
        lr=1e-3,
        token_budget=8192,
        baseline=False,
        early_stopping_patience=None,
        random_state=0,
    )
    return clf.encoder, float(adata.uns[f"{label_key}_finetune"]["accuracy"])


def calibration(model, cells: ad.AnnData, seeds: int, max_cells: int, label: str) -> None:
    rows = []
    for seed in range(seeds):
        fake = cells.copy()
        rng = np.random.default_rng(seed)
        fake.obs["fake"] = np.where(rng.random(fake.n_obs) < 0.5, "a", "b")
        for alternative in ALTERNATIVES:
            sgf.tl.in_silico_delete(
                fake,
                model,
                state_key="fake",
                start_state="a",
                goal_state="b",
                max_cells=max_cells,
                alternative=alternative,
                emb_layer=0,
                random_state=seed,
            )
            p = fake.var["in_silico_delete_pval"].dropna().to_numpy()
            fdr = fake.var["in_silico_delete_fdr"].dropna().to_numpy()
            rows.append(
                {
                    "seed": seed,
                    "alternative": alternative,
                    "genes": len(p),
                    "FDR<0.05": (fdr < 0.05).mean(),
                    "p<0.05": (p < 0.05).mean(),
                    "KS": stats.kstest(p, "uniform").statistic,
                    "KS 5% bound": 1.358 / np.sqrt(len(p)),
                }
            )
    table = pd.DataFrame(rows)
    print(f"\n## Calibration, {label} ({seeds} seeds, {max_cells} start cells)")
    print(markdown(table))
    summary = table.groupby("alternative")[["FDR<0.05", "p<0.05", "KS"]].agg(["mean", "max"])
    summary.columns = [" ".join(c) for c in summary.columns]
    print(markdown(summary, index=True))


def power(n_cells: int, max_cells: int):
    adata = sgf.datasets.synthetic_states(n_cells=n_cells, random_state=0)
    encoder, accuracy = fine_tune(adata, "state", epochs=6)
    rows = []
    for alternative in ALTERNATIVES:
        sgf.tl.in_silico_delete(
            adata,
            encoder,
            state_key="state",
            start_state="disease",
            goal_state="healthy",
            max_cells=max_cells,
            emb_layer=0,
            alternative=alternative,
            store_per_cell=True,
        )
        var = adata.var[adata.var["in_silico_delete_fdr"].notna()]
        role = var["gene_role"]
        rows.append(
            {
                "statistic": f"ours, {alternative}",
                "drivers": int((role == "driver").sum()),
                "drivers FDR<0.05": (var["in_silico_delete_fdr"][role == "driver"] < 0.05).mean(),
                "neutral FDR<0.05": (var["in_silico_delete_fdr"][role == "neutral"] < 0.05).mean(),
                "all genes FDR<0.05": (var["in_silico_delete_fdr"] < 0.05).mean(),
                "smallest FDR": var["in_silico_delete_fdr"].min(),
            }
        )
    theirs = sgf.tl.perturbation_stats(adata).join(adata.var["gene_role"])
    theirs = theirs[adata.var["in_silico_delete_n_cells"].reindex(theirs.index) >= 3]
    rows.append(
        {
            "statistic": "Geneformer goal_state_shift",
            "drivers": int((theirs["gene_role"] == "driver").sum()),
            "drivers FDR<0.05": (
                theirs["Goal_end_FDR"][theirs["gene_role"] == "driver"] < 0.05
            ).mean(),
            "neutral FDR<0.05": (
                theirs["Goal_end_FDR"][theirs["gene_role"] == "neutral"] < 0.05
            ).mean(),
            "all genes FDR<0.05": (theirs["Goal_end_FDR"] < 0.05).mean(),
            "smallest FDR": theirs["Goal_end_FDR"].min(),
        }
    )
    print(
        f"\n## Power, synthetic_states ({n_cells} cells, classifier accuracy {accuracy:.3f}, "
        f"{max_cells} disease cells deleted; floor of p: 2^-{max_cells} = {2.0**-max_cells:.1e})"
    )
    print(markdown(pd.DataFrame(rows)))
    healthy = adata[adata.obs["state"] == "healthy"].copy()
    return encoder, healthy


def kang(max_cells: int) -> None:
    adata = ad.read_h5ad(KANG)
    encoder, accuracy = fine_tune(adata, "condition", epochs=4)
    screen = dict(state_key="condition", start_state="stim", goal_state="ctrl", emb_layer=0)
    sgf.tl.in_silico_delete(adata, encoder, max_cells=max_cells, store_per_cell=True, **screen)
    var = adata.var[adata.var["in_silico_delete_fdr"].notna()]
    cols = ["in_silico_delete_zscore", "in_silico_delete_pval", "in_silico_delete_fdr"]
    cols += ["in_silico_delete_n_cells", "in_silico_delete_frac_toward"]
    print(
        f"\n## Kang 2018, stim -> ctrl (accuracy {accuracy:.3f}, {max_cells} stim cells, "
        f"{len(var)} genes tested, {(var['in_silico_delete_fdr'] < 0.05).sum()} at FDR < 0.05; "
        f"smallest FDR {var['in_silico_delete_fdr'].min():.2g}, smallest p "
        f"{var['in_silico_delete_pval'].min():.2g}, floor 2^-{max_cells} = {2.0**-max_cells:.1e})"
    )
    isg = var.loc[var.index.isin(ISGS), cols]
    isg.insert(1, "zscore percentile", var["in_silico_delete_zscore"].rank(pct=True)[isg.index])
    print(markdown(isg, index=True))
    theirs = sgf.tl.perturbation_stats(adata)
    theirs = theirs.loc[var.index]
    print(
        f"Geneformer goal_state_shift on the same shifts: {(theirs['Goal_end_FDR'] < 0.05).sum()}"
        f" of {len(theirs)} genes at FDR < 0.05, smallest FDR {theirs['Goal_end_FDR'].min():.2g}"
    )
    listed = ["MX1", "ISG15", "IFIT1"]
    for background in (200, 0):
        short = ad.read_h5ad(KANG)
        sgf.tl.in_silico_delete(
            short, encoder, genes=listed, n_null_genes=background, max_cells=max_cells, **screen
        )
        fdr = short.var["in_silico_delete_fdr"][listed].round(5).to_dict()
        print(f"genes={listed}, n_null_genes={background}: FDR {fdr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["calibration", "power", "kang"])
    parser.add_argument("--cells", type=int, default=800, help="synthetic_states cells")
    parser.add_argument("--max-cells", type=int, default=30, help="start cells screened")
    args = parser.parse_args()
    sgf.settings.progress = False
    warnings.simplefilter("ignore", UserWarning)
    began = time.perf_counter()
    random_model = None
    if "calibration" in args.parts:
        cells = sgf.datasets.synthetic_states(n_cells=args.cells, random_state=1)
        cells = cells[cells.obs["state"] == "healthy"].copy()
        vocab = sgf.Vocabulary.build(cells, max_length=256, min_cells=10)
        random_model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **SMALL)
        calibration(random_model, cells, args.seeds, args.max_cells, "random-weight model")
    if "power" in args.parts:
        encoder, healthy = power(args.cells, args.max_cells)
        if "calibration" in args.parts:
            calibration(encoder, healthy, args.seeds, args.max_cells, "fine-tuned encoder")
    if "kang" in args.parts and KANG.exists():
        kang(args.max_cells)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
