"""Benchmark: ``tl.pretrain`` throughput, and building a token store from h5ad files.

Pretraining: random gene tokens (lengths uniform in [length/2, length], <cls>/<eos> around
them) over a vocabulary of V1's size (25,424 genes), a fresh model of the chosen preset, the
real training loop (masking, MLM head on masked positions only, AdamW, clipping, one
checkpoint at the end, no evaluation). On the CPU batches are padded (float32); on CUDA they
are packed (varlen attention, bfloat16 autocast). Reported: tokens/s (all real tokens, the
median over logging intervals after the first, which holds start-up costs) and the time of
the final checkpoint.

References, in the same run on the same cells and starting weights: ``transformers``'
``BertForMaskedLM`` trained the way Geneformer trained it: fp32, eager attention, padded
length-grouped batches, the collator's 15% masking (80/10/10) with the MLM head and loss over
every position, AdamW with clipping; then the same with SDPA attention, and with bfloat16
autocast where the device supports it (``bench/_reference.py``). Geneformer's batches are a
number of cells (12); here each reference batch holds as many cells as fit the same token
budget as ours (padded tokens), so both take steps of the same size. Reported: the median
tokens/s over its steps after the first. Needs ``transformers`` (the test extra);
``--no-reference`` skips it.

Token store: ``synthetic_states`` counts written to h5ad files, tokenized into a store with
``n_jobs`` 1 and 2 (worker processes over files); cells/s including worker start-up.

Run: ``.venv/bin/python bench/bench_pretrain.py [--preset V1-10M] [--length 256]
[--steps 12] [--token-budget 4096] [--store-cells 20000] [--no-reference]``
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
import torch

import scgeneformer as sgf
from scgeneformer.data._store_build import build_token_store
from scgeneformer.tl._pretrain import pretrain

V1_GENES = 25_424


def random_token_cells(vocab: sgf.Vocabulary, n_cells: int, length: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = vocab.gene_token_ids
    lengths = rng.integers(length // 2, length + 1, n_cells)
    tokens = np.zeros((n_cells, length), dtype=np.uint16)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, n - 1] = vocab.cls_id, vocab.eos_id
        tokens[i, 1 : n - 1] = rng.choice(genes, n - 2, replace=False)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    adata.obsm["geneformer_tokens"] = tokens
    adata.obs["geneformer_n_tokens"] = lengths
    adata.uns["geneformer"] = {"vocabulary_sha256": vocab.sha256, "vocabulary_name": vocab.name}
    return adata


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Batches as Geneformer's length-grouped sampler makes them: shuffled mega-batches of 50
    batches, each sorted by length (longest first) and cut into batches."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    batches = []
    mega = 50 * batch_size
    for start in range(0, len(order), mega):
        group = order[start : start + mega]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def collator_masking(ids: torch.Tensor, maskable: torch.Tensor, vocab, generator):
    """The MLM collator's masking: 15% of maskable tokens; 80% ``<mask>``, 10% random, 10%
    kept. Returns ``(inputs, labels)`` with -100 where nothing is predicted."""
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & maskable
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(ids, vocab.mask_id), ids)
    random_ids = torch.randint(len(vocab), ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, inputs)
    return inputs, labels


def reference_tokens_per_s(
    reference: _reference.Reference,
    folder: Path,
    adata: ad.AnnData,
    vocab: sgf.Vocabulary,
    steps: int,
    token_budget: int,
) -> list[float]:
    """Tokens/s of each step of ``BertForMaskedLM`` trained as Geneformer trained it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _reference.load(folder, reference, device, train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    tokens = adata.obsm["geneformer_tokens"]
    lengths = adata.obs["geneformer_n_tokens"].to_numpy()
    special = torch.as_tensor([vocab.cls_id, vocab.eos_id])
    generator = torch.Generator().manual_seed(0)
    cells_per_batch = max(1, token_budget // tokens.shape[1])
    rates = []
    for batch in length_grouped_batches(lengths, cells_per_batch, seed=0)[:steps]:
        width = int(lengths[batch].max())
        ids = torch.as_tensor(tokens[batch, :width].astype(np.int64))
        attention = torch.arange(width)[None, :] < torch.as_tensor(lengths[batch])[:, None]
        inputs, labels = collator_masking(
            ids, attention & ~torch.isin(ids, special), vocab, generator
        )
        inputs, labels, attention = inputs.to(device), labels.to(device), attention.to(device)
        start = time.perf_counter()
        with _reference.precision(reference, device):
            loss = model(input_ids=inputs, attention_mask=attention.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(int(attention.sum()) / (time.perf_counter() - start))
    return rates[1:]


def bench_pretrain(args: argparse.Namespace, folder: Path) -> None:
    genes = [f"ENSG{i:011d}" for i in range(1, V1_GENES + 1)]
    vocab = sgf.Vocabulary(
        {g: 4 + i for i, g in enumerate(genes)},
        dict.fromkeys(genes, 1.0),
        special_tokens={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3},
        name="bench",
        max_length=args.length,
    )
    n_cells = max(200, 4 * args.steps * args.token_budget // args.length)
    adata = random_token_cells(vocab, n_cells, args.length, seed=0)
    model = sgf.Geneformer.from_config(
        args.preset, vocab, random_state=0, max_position_embeddings=max(args.length, 2048)
    )
    references = {}
    if not args.no_reference:
        model.save(folder / "reference_start")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for reference in _reference.references(device):
            references[reference.label] = reference_tokens_per_s(
                reference, folder / "reference_start", adata, vocab, args.steps, args.token_budget
            )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warm-up warning of a short run
        model = pretrain(
            adata,
            model,
            output_dir=folder / "run",
            max_steps=args.steps,
            warmup_steps=1,
            token_budget=args.token_budget,
            save_every=args.steps,
            log_every=max(1, args.steps // 6),
            eval_fraction=0.0,
            progress=False,
        )
    wall = time.perf_counter() - start
    rates = [r["tokens_per_s"] for r in model.training_args["history"]["train"][1:]]
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"pretrain {args.preset} on {name} ({torch.get_num_threads()} threads), "
        f"{'packed bf16' if device.type == 'cuda' else 'padded fp32'}, cells of "
        f"{args.length // 2}-{args.length} tokens, budget {args.token_budget:,}: "
        f"{np.median(rates):,.0f} tokens/s (intervals: {', '.join(f'{r:,.0f}' for r in rates)}); "
        f"{args.steps} steps + setup + checkpoint in {wall:.1f} s"
    )
    print(_reference.machine())
    for label, rate in references.items():
        ratio = np.median(rates) / np.median(rate)
        print(
            f"{label}, padded length-grouped batches of "
            f"{max(1, args.token_budget // args.length)} cells (at most {args.token_budget:,} "
            f"tokens): {np.median(rate):,.0f} tokens/s; ours {ratio:.1f}x"
        )
    start = time.perf_counter()
    model.save(folder / "again")
    print(
        f"model.save of {sum(p.numel() for p in model.parameters()):,} parameters: "
        f"{time.perf_counter() - start:.2f} s"
    )


def bench_store(args: argparse.Namespace, folder: Path) -> None:
    per_file = args.store_cells // 4
    paths = []
    for i in range(4):
        adata = sgf.datasets.synthetic_states(n_cells=per_file, n_genes=2000, random_state=i)
        paths.append(folder / f"part{i}.h5ad")
        adata.write_h5ad(paths[-1])
    vocab = sgf.Vocabulary.build(paths[0], max_length=2048)
    for n_jobs in (1, 2):
        start = time.perf_counter()
        store = build_token_store(paths, vocab, folder / f"store{n_jobs}", n_jobs=n_jobs)
        seconds = time.perf_counter() - start
        print(
            f"token store, n_jobs={n_jobs}: {len(store):,} cells in 4 files, {seconds:.2f} s, "
            f"{len(store) / seconds:,.0f} cells/s, {store.manifest['n_tokens']:,} tokens"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="V1-10M")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--store-cells", type=int, default=20_000)
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    args = parser.parse_args()
    sgf.settings.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        bench_pretrain(args, Path(tmp))
        if args.store_cells:
            bench_store(args, Path(tmp))


if __name__ == "__main__":
    main()
