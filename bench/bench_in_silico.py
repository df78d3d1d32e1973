"""Benchmark: ``tl.in_silico_delete`` against the same deletions run as Geneformer runs them.

PBMC 3k cells tokenized with the official V1 dictionary, cut to ``--length`` tokens (small for
the CPU), or with ``--source random`` (the default where ../shared is absent, as on a GPU
machine) cells of exactly ``--length`` random genes; V1-10M with random weights (the official
config).
The first ``--cells`` cells are the start state, the next ``--goal-cells`` the goal state.
Every gene of every start cell is deleted in turn. On a CUDA machine both run on the GPU.

The references are ``transformers``' ``BertForMaskedLM`` as Geneformer's perturber runs it:
eager attention, fp32, batches of 100 variants, all hidden states returned, the second-to-last
layer mean-pooled over the tokens, the shift ``cos(variant, goal) - cos(original, goal)``
against the mean embedding of the goal cells; then the same with SDPA attention, and with
bfloat16 autocast where the device supports it (``bench/_reference.py``). Ours is
``sgf.tl.in_silico_delete`` with its statistics and the per-cell layer. Models are loaded
before the timers start. All run in this process; the per-cell shifts are compared with ours.

Run: ``.venv/bin/python bench/bench_in_silico.py [--cells 8] [--goal-cells 40] [--length 128]
[--source auto|pbmc|random]``; on a GPU, ``--source random --length 1400`` is Geneformer's
typical V1 cell.

``--methods`` instead compares the three methods of ``in_silico_delete`` on the same cells:
``synthetic_states`` cells of ``--length`` genes, a small state classifier fine-tuned from
scratch (its accuracy printed), every gene of ``--cells`` disease cells deleted toward the
healthy state by ``exact``, ``first_order`` and ``two_stage``. It prints wall time per cell,
exact variants per second, the speed-up over exact, per-cell Spearman of the estimates with
the exact shifts, the recall of each cell's exact top 10 within its first-order top ``n``
and within the candidates ``two_stage`` would choose with ``n_exact = n`` (``n`` swept), and
the planted drivers' AUROC against neutral genes by each method's z-score. ``--data kang``
runs the same on Kang 2018 (stimulated toward control; the interferon genes' AUROC instead).
``--train-length`` fine-tunes on cells cut shorter than the screened ``--length`` (for
2,048-token screens on a CPU). Run:
``.venv/bin/python bench/bench_in_silico.py --methods --length 256 --cells 24``.
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
import pandas as pd
import scipy.sparse as sp
import torch

import scgeneformer as sgf
from scgeneformer.tl._first_order import choose_candidates

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "geneformer_ref"
V1_GENES = 25_424
# The classifier of --methods on the CPU; --full-model keeps V1-10M's own shape.
SMALL_CLASSIFIER = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128
)
BATCH = 100


def pooled(model, ids: torch.Tensor) -> torch.Tensor:
    """Second-to-last layer mean-pooled over non-pad tokens, as Geneformer reads it."""
    keep = ids != 0
    states = model(ids, attention_mask=keep.long(), output_hidden_states=True).hidden_states[-2]
    return (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)


def reference_shifts(model, tokens, n_tokens, start, goal) -> dict[tuple[int, int], float]:
    """Shift of each (start cell, deleted token), the way Geneformer computes it."""
    device = model.device
    cos = torch.nn.CosineSimilarity(dim=-1)
    shifts = {}
    with torch.no_grad():
        goal_ids = torch.as_tensor(tokens[goal].astype(np.int64), device=device)
        goal_mean = torch.cat(
            [pooled(model, goal_ids[i : i + BATCH]) for i in range(0, len(goal), BATCH)]
        ).mean(0)
        for cell in start:
            row = tokens[cell, : n_tokens[cell]].astype(np.int64)
            original = pooled(model, torch.as_tensor(row[None], device=device))
            base = cos(original, goal_mean).item()
            variants = np.stack([np.delete(row, i) for i in range(len(row))])
            variants = torch.as_tensor(variants, device=device)
            for i in range(0, len(row), BATCH):
                moved = cos(pooled(model, variants[i : i + BATCH]), goal_mean[None]) - base
                for offset, shift in enumerate(moved.tolist()):
                    shifts[(int(cell), int(row[i + offset]))] = shift
    return shifts


def pbmc_cells(n_cells: int, length: int) -> tuple[ad.AnnData, sgf.Vocabulary]:
    """PBMC 3k cells tokenized with the official V1 dictionary, cut to ``length`` tokens."""
    cells = ad.read_h5ad(SHARED / "data" / "pbmc3k" / "pbmc3k_labelled_counts.h5ad")[:n_cells]
    cells = cells.copy()
    vocab = sgf.Vocabulary.from_geneformer(
        REF / "token_dictionary_gc30M.pkl", REF / "gene_median_dictionary_gc30M.pkl"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sgf.pp.rank_tokenize(cells, vocab, max_length=length)
    return cells, vocab


def random_cells(n_cells: int, length: int) -> tuple[ad.AnnData, sgf.Vocabulary]:
    """Cells of ``length`` distinct random genes over a V1-sized vocabulary (no <cls>/<eos>).

    Runs anywhere, a GPU machine without ../shared included; only lengths matter for speed.
    """
    genes = [f"ENSG{i:011d}" for i in range(1, V1_GENES + 1)]
    vocab = sgf.Vocabulary(
        {g: 2 + i for i, g in enumerate(genes)},
        dict.fromkeys(genes, 1.0),
        special_tokens={"<pad>": 0, "<mask>": 1},
        name="random",
        max_length=max(length, 2048),
    )
    rng = np.random.default_rng(0)
    tokens = np.stack(
        [rng.choice(vocab.gene_token_ids, length, replace=False) for _ in range(n_cells)]
    )
    cells = ad.AnnData(
        sp.csr_matrix((n_cells, len(genes)), dtype=np.float32),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame({"geneformer_token": vocab.tokens_for(genes)}, index=genes),
    )
    cells.obsm["geneformer_tokens"] = tokens.astype(np.uint16)
    cells.obs["geneformer_n_tokens"] = np.full(n_cells, length)
    cells.uns["geneformer"] = {"vocabulary_sha256": vocab.sha256, "vocabulary_name": vocab.name}
    return cells, vocab


def state_cells(n_cells: int, length: int) -> ad.AnnData:
    """``synthetic_states`` with enough genes and counts for cells of about ``length`` genes."""
    n_genes = max(600, int(length * 1.6))
    adata = sgf.datasets.synthetic_states(
        n_cells=n_cells,
        n_genes=n_genes,
        mean_library_size=max(3000.0, 12.0 * length),
        random_state=0,
    )
    return adata


def per_cell_agreement(exact: sp.csr_matrix, estimate: sp.csr_matrix, sweep) -> dict:
    """Per-cell Spearman of estimates with exact shifts; recall of exact top 10 in top n."""
    from scipy.stats import spearmanr

    rhos, recall = [], {n: [] for n in sweep}
    for c in np.unique(exact.nonzero()[0]):
        cols = exact[c].indices
        truth = exact[c, cols].toarray().ravel()
        guess = estimate[c, cols].toarray().ravel()
        rhos.append(spearmanr(truth, guess).statistic)
        top = set(cols[np.argsort(-truth)[:10]])
        ranked = cols[np.argsort(-guess)]
        for n in sweep:
            recall[n].append(len(top & set(ranked[:n])) / len(top))
    return {"spearman": float(np.median(rhos)), **{n: float(np.mean(r)) for n, r in recall.items()}}


INTERFERON_GENES = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "ISG20", "IFITM3", "IFI44L", "RSAD2"]


def kang_cells(n_cells: int) -> ad.AnnData:
    """Kang 2018 PBMCs (harmony's ctrl/stim), ``n_cells`` drawn at random, half of each state."""
    adata = ad.read_h5ad(SHARED / "data" / "kang2018_ifnb" / "kang2018_harmony_ctrl_stim.h5ad")
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [
            rng.choice(np.flatnonzero(adata.obs["condition"] == state), n_cells // 2, replace=False)
            for state in ("ctrl", "stim")
        ]
    )
    adata = adata[np.sort(keep)].copy()
    adata.obs["state"] = adata.obs["condition"].astype(str)
    return adata


def candidate_recall(exact, estimate, tokens, n_tokens, column_of, sweep) -> dict:
    """Recall of each cell's exact top 10 within its two-stage candidates, ``n_exact`` swept."""
    recall = {n: [] for n in sweep}
    for c in np.unique(exact.nonzero()[0]):
        row = tokens[c, : n_tokens[c]]
        cols = np.array([column_of.get(int(t), -1) for t in row])
        genes = np.flatnonzero(cols >= 0)
        truth = exact[c, cols[genes]].toarray().ravel()
        guess = torch.as_tensor(estimate[c, cols[genes]].toarray().ravel())
        top = set(genes[np.argsort(-truth)[:10]].tolist())
        for n in sweep:
            # The probe answers with the exact shifts the screen's first round would measure.
            chosen = choose_candidates(guess, torch.as_tensor(genes), n, truth.__getitem__)
            recall[n].append(len(top & set(genes[chosen].tolist())) / len(top))
    return {n: float(np.mean(r)) for n, r in recall.items()}


def pretrained(adata: ad.AnnData, model: sgf.Geneformer, steps: int) -> sgf.Geneformer:
    """``model`` after ``steps`` of masked-gene pretraining on the bench's own cells.

    A classifier fine-tuned from random weights keeps near-random position embeddings
    (neighbours' cosine about 0.2), so deleting a gene, which moves every later gene one
    place, changes the cell far more than in a pretrained Geneformer. Pretraining first is
    closer to what users screen with.
    """
    with tempfile.TemporaryDirectory() as folder:
        return sgf.tl.pretrain(
            adata,
            model,
            output_dir=folder,
            max_steps=steps,
            warmup_steps=max(1, steps // 10),
            token_budget=8192,
            save_every=steps,
            log_every=steps,
            progress=False,
        )


def compare_methods(args) -> None:
    """The three methods of ``in_silico_delete`` side by side on a fine-tuned classifier."""
    from sklearn.metrics import roc_auc_score

    train_length = args.train_length or args.length
    if args.data == "kang":
        adata = kang_cells(args.train_cells)
        start, goal = "stim", "ctrl"
    else:
        adata = state_cells(args.train_cells, args.length)
        start, goal = "disease", "healthy"
    vocab = sgf.Vocabulary.build(adata, max_length=args.length, min_cells=10)
    model = sgf.Geneformer.from_config(
        "V1-10M",
        vocab,
        random_state=0,
        max_position_embeddings=args.length,
        **({} if args.full_model else SMALL_CLASSIFIER),
    )
    # Fine-tuning at 2,048 tokens is too slow for a shared CPU: the classifier may learn on
    # cells cut to --train-length, and the screen then runs on the full --length cells.
    sgf.pp.rank_tokenize(adata, vocab, max_length=train_length)
    began = time.perf_counter()
    if args.pretrain_steps:
        model = pretrained(adata, model, args.pretrain_steps)
    clf = sgf.tl.finetune(
        adata,
        model,
        label_key="state",
        epochs=args.epochs,
        lr=1e-3,
        token_budget=8192,
        baseline=False,
        early_stopping_patience=None,
    )
    train_s = time.perf_counter() - began
    accuracy = adata.uns["state_finetune"]["accuracy"]
    positions = clf.encoder.state_dict()["bert.embeddings.position_embeddings.weight"]
    neighbours = torch.nn.functional.cosine_similarity(positions[1:], positions[:-1])
    if train_length != args.length:
        sgf.pp.rank_tokenize(adata, vocab, max_length=args.length)
    n_tokens = adata.obs["geneformer_n_tokens"].to_numpy()
    kwargs = dict(
        state_key="state",
        start_state=start,
        goal_state=goal,
        max_cells=args.cells,
        emb_layer=0,
        store_per_cell=True,
    )
    runs = {}
    for method in ("exact", "first_order", "two_stage"):
        extra = {"n_exact": args.n_exact} if method == "two_stage" else {}
        began = time.perf_counter()
        sgf.tl.in_silico_delete(
            adata, clf.encoder, method=method, key_added=method, **kwargs, **extra
        )
        runs[method] = time.perf_counter() - began
    # What every method pays before its first cell: the goal state's mean embedding.
    goal_cells = adata[adata.obs["state"] == goal].copy()
    began = time.perf_counter()
    sgf.tl.embed(goal_cells, clf.encoder, emb_layer=0)
    shared_s = time.perf_counter() - began
    cells = np.unique(adata.layers["exact"].nonzero()[0])
    n_exact = adata.uns["two_stage"]["n_exact"]
    sweep = sorted({10, 16, 24, 32, 40, n_exact, 48, 64})
    exact = adata.layers["exact"].tocsr()
    estimate = adata.layers["first_order_estimate"].tocsr()
    agreement = per_cell_agreement(exact, estimate, sweep)
    column_of = {t: j for j, t in enumerate(adata.var["geneformer_token"]) if t >= 0}
    tokens = adata.obsm["geneformer_tokens"]
    chosen = candidate_recall(exact, estimate, tokens, n_tokens, column_of, sweep)
    var = adata.var
    if args.data == "kang":
        label = "interferon-gene AUROC (z)"
        tested = var["exact_n_cells"] >= 3
        positive = var.index.isin(INTERFERON_GENES)
    else:
        label = "driver AUROC (z)"
        tested = var["gene_role"].isin(["driver", "neutral"])
        positive = var["gene_role"] == "driver"

    def auroc(column: str) -> float:
        values = var.loc[tested, column]
        ok = values.notna()
        return roc_auc_score(positive[tested][ok], values[ok])

    data = (
        f"Kang 2018 ({args.train_cells} cells, stim -> ctrl)"
        if args.data == "kang"
        else f"synthetic_states, {args.train_cells} cells"
    )
    print(
        f"{data}, classifier ({'V1-10M' if args.full_model else '2 layers, hidden 64'}) "
        f"{f'pretrained {args.pretrain_steps} steps, ' if args.pretrain_steps else ''}"
        f"fine-tuned {args.epochs} epochs on cells of "
        f"{train_length} tokens at most in {train_s:.0f} s, accuracy {accuracy:.3f}; "
        f"neighbouring position embeddings' cosine {neighbours.mean():.2f}; "
        f"{len(cells)} {start} cells of {n_tokens[cells].mean():.0f} tokens on average; "
        f"CPU fp32, {torch.get_num_threads()} threads"
    )
    print(f"| method | s per cell | exact variants/s | vs exact | exact share | {label} |")
    print("|---|---|---|---|---|---|")
    for method, seconds in runs.items():
        uns = adata.uns[method]
        rate = uns["n_perturbations"] / seconds
        print(
            f"| {method} | {seconds / len(cells):.3f} | {rate:,.0f} | "
            f"{runs['exact'] / seconds:.1f}x | {uns['exact_share']:.3f} | "
            f"{auroc(f'{method}_zscore'):.3f} |"
        )
    beyond = (runs["exact"] - shared_s) / (runs["two_stage"] - shared_s)
    print(
        f"shared by the three: the {goal} state's embedding ({goal_cells.n_obs} cells), "
        f"{shared_s:.1f} s; beyond it two_stage is {beyond:.1f}x faster than exact"
    )
    print(
        f"first-order against exact: per-cell Spearman (median) {agreement['spearman']:.3f}; "
        f"{label.split(' (')[0]} of the mean estimate {auroc('first_order_estimate'):.3f}"
    )
    print(
        "recall of each cell's exact top 10 within its first-order top n: "
        + ", ".join(f"n={n}: {agreement[n]:.3f}" for n in sweep)
    )
    print(
        "recall of each cell's exact top 10 within its two-stage candidates (n_exact = n): "
        + ", ".join(f"n={n}: {chosen[n]:.3f}" for n in sweep)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8, help="start-state cells")
    parser.add_argument("--goal-cells", type=int, default=40)
    parser.add_argument("--length", type=int, default=128, help="tokens per cell at most")
    parser.add_argument(
        "--source",
        choices=("auto", "pbmc", "random"),
        default="auto",
        help="PBMC 3k with the official V1 dictionary (needs ../shared), or random genes of a "
        "V1-sized vocabulary, every cell --length long (default: PBMC when present)",
    )
    parser.add_argument(
        "--methods",
        action="store_true",
        help="compare exact, first_order and two_stage on synthetic states instead",
    )
    parser.add_argument("--train-cells", type=int, default=800, help="with --methods")
    parser.add_argument("--epochs", type=int, default=6, help="with --methods")
    parser.add_argument("--n-exact", type=int, default=None, help="with --methods")
    parser.add_argument(
        "--full-model",
        action="store_true",
        help="with --methods: a V1-10M-shaped classifier (6 layers, hidden 256), for a GPU",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="with --methods: masked-gene pretraining steps before fine-tuning (default none)",
    )
    parser.add_argument(
        "--data",
        choices=("synthetic", "kang"),
        default="synthetic",
        help="with --methods: synthetic_states (disease -> healthy) or Kang 2018 (stim -> ctrl)",
    )
    parser.add_argument(
        "--train-length",
        type=int,
        default=None,
        help="with --methods: fine-tune on cells cut to this many tokens (default --length)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's); 1 is steadier on a shared machine",
    )
    args = parser.parse_args()
    sgf.settings.progress = False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.methods:
        compare_methods(args)
        return

    if args.source == "auto":
        args.source = "pbmc" if (SHARED / "data").is_dir() else "random"
    n_cells = args.cells + args.goal_cells
    if args.source == "pbmc":
        cells, vocab = pbmc_cells(n_cells, args.length)
    else:
        cells, vocab = random_cells(n_cells, args.length)
    cells.obs["state"] = ["start"] * args.cells + ["goal"] * args.goal_cells
    tokens = cells.obsm["geneformer_tokens"]
    n_tokens = cells.obs["geneformer_n_tokens"].to_numpy()
    start, goal = np.arange(args.cells), np.arange(args.cells, len(n_tokens))
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    began = time.perf_counter()
    sgf.tl.in_silico_delete(
        cells,
        model,
        state_key="state",
        start_state="start",
        goal_state="goal",
        min_cells=1,
        store_per_cell=True,
        device=device,
    )
    ours_s = time.perf_counter() - began
    n_variants = cells.uns["in_silico_delete"]["n_perturbations"]
    column_of = {t: j for j, t in enumerate(cells.var["geneformer_token"]) if t >= 0}
    per_cell = cells.layers["in_silico_delete"].tocsr()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        for reference in _reference.references(device):
            hf = _reference.load(folder, reference, device)
            began = time.perf_counter()
            with _reference.precision(reference, device):
                expected = reference_shifts(hf, tokens, n_tokens, start, goal)
            seconds = time.perf_counter() - began
            error = max(abs(per_cell[c, column_of[t]] - s) for (c, t), s in expected.items())
            rows.append((reference.label, seconds, len(expected), error))
    scale = max(abs(per_cell.data).max(), 1e-30)
    print(
        f"V1-10M, {args.cells} start cells of {n_tokens[start].mean():.0f} tokens on average, "
        f"{len(goal)} goal cells, {n_variants:,} variants ({rows[0][2]:,} in the references)"
    )
    print(_reference.machine())
    first = rows[0][1]
    print("| run | seconds | variants/s | vs Geneformer's settings | max shift difference |")
    print("|---|---|---|---|---|")
    for label, seconds, n, error in rows:
        print(
            f"| {label}, batches of {BATCH}, all hidden states | {seconds:.1f} "
            f"| {n / seconds:,.0f} | {first / seconds:.1f}x | {error:.1e} |"
        )
    print(
        f"| sgf.tl.in_silico_delete (dense variant batches, stops at the layer read, "
        f"statistics included) | {ours_s:.1f} | {n_variants / ours_s:,.0f} "
        f"| {first / ours_s:.1f}x | - |"
    )
    best = min(r[1] for r in rows)
    print(f"sgf.tl.in_silico_delete vs the fastest reference: {best / ours_s:.1f}x")
    print(f"largest per-cell shift: {scale:.1e}")


if __name__ == "__main__":
    main()
