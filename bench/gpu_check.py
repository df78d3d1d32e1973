"""GPU check of the packed encoder: accuracy against the padded path, speed against transformers.

1. Accuracy: on random V1-10M weights, mean-pooled cell embeddings from the packed bf16 path
   (flash ``varlen_attn`` on CUDA) against our padded fp32 path and transformers fp32, at the
   last and penultimate layer. Passes when the relative error is <= 1e-2 (bf16) and <= 1e-4
   (transformers fp32 vs ours fp32).
2. Speed: cells/s embedding synthetic cells (V1-10M, ~1,400 tokens; V2-104M, ~2,800) with
   - transformers ``BertForMaskedLM`` run the way Geneformer runs it: fp32, eager attention,
     cells sorted by length, padded batches of 100 (halved on out-of-memory),
     ``output_hidden_states=True``, reading the penultimate layer;
   - our packed path, bf16, token-budget batches, stopping at the penultimate layer;
   - the same wrapped in ``torch.compile(dynamic=True)`` (on CUDA, or with ``--compile``).

Run ``python bench/gpu_check.py`` on a CUDA machine (about 3-5 minutes on one H100/H200);
``--small`` uses tiny sizes so the code runs anywhere in seconds. Results are printed and
written as a Markdown table to ``--out`` (default ``$OUT/gpu_check.md``, else
``bench/_out/gpu_check.md``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch

import scgeneformer as sgf
from scgeneformer._plan import attention_backend, execution_plan
from scgeneformer.data import pack_tokens, restore_order, token_budget_batches
from scgeneformer.model import PRESETS, Geneformer, GeneformerConfig
from scgeneformer.model._attention import packed_positions

TINY = GeneformerConfig(2, 64, 4, 128, 256, vocab_size=300)


def synthetic_vocab(size: int, max_length: int) -> sgf.Vocabulary:
    genes = {f"ENSG{i:011d}": i + 4 for i in range(size - 4)}
    return sgf.Vocabulary(
        genes,
        dict.fromkeys(genes, 1.0),
        special_tokens={"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3},
        max_length=max_length,
    )


def synthetic_cells(vocab: sgf.Vocabulary, n: int, mean: int, seed: int = 0):
    """Right-padded token rows (<cls> genes <eos>) with lengths spread around ``mean``."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(mean, mean / 3, n), 16, vocab.max_length).astype(np.int64)
    tokens = np.zeros((n, lengths.max()), dtype=np.int64)
    genes = vocab.gene_token_ids
    for row, length in enumerate(lengths):
        tokens[row, 1 : length - 1] = rng.choice(genes, length - 2, replace=False)
        tokens[row, 0], tokens[row, length - 1] = vocab.cls_id, vocab.eos_id
    return tokens, lengths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mean_pool_padded(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(torch.float32)[..., None]
    return (hidden.float() * weights).sum(1) / weights.sum(1)


def mean_pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    cell, _ = packed_positions(cu_seqlens, hidden.shape[0])
    n_cells = cu_seqlens.numel() - 1
    sums = hidden.new_zeros((n_cells, hidden.shape[1]), dtype=torch.float32)
    sums.index_add_(0, cell, hidden.float())
    return sums / (cu_seqlens[1:] - cu_seqlens[:-1]).float()[:, None]


def embed_hf(hf, tokens, lengths, layer, device, batch_size):
    """Geneformer's way: sorted by length, padded batches, all hidden states, fp32."""
    order = np.argsort(-lengths, kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        ids = torch.from_numpy(tokens[rows, :width]).to(device)
        mask = (
            torch.arange(width, device=device)[None]
            < torch.from_numpy(lengths[rows]).to(device)[:, None]
        )
        with torch.no_grad():
            states = hf(ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        out.append(mean_pool_padded(states[layer], mask).cpu())
    pooled = torch.cat(out)
    return pooled[torch.from_numpy(np.argsort(order))]


def embed_packed(run, tokens, lengths, device, budget, max_seqlen=None):
    """Our way: token-budget batches of packed cells; ``run(flat, cu, max_seqlen)``."""
    batches = token_budget_batches(lengths, budget, padded=False)
    out = []
    for rows in batches:
        flat, cu, longest = pack_tokens(tokens[rows], lengths[rows])
        with torch.no_grad():
            hidden = run(flat.to(device), cu.to(device), max_seqlen or longest)
        out.append(mean_pool_packed(hidden, cu.to(device)).cpu())
    return restore_order(out, batches)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def load_hf(model: Geneformer, device: torch.device):
    import transformers
    from transformers import BertForMaskedLM

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "m")
        hf = BertForMaskedLM.from_pretrained(Path(tmp) / "m", attn_implementation="eager")
    return hf.to(device).eval()


@torch.no_grad()
def check_accuracy(config, vocab, device, n_cells, mean_len, budget) -> list[str]:
    model = Geneformer.from_config(config, vocab, random_state=0).to(device).eval()
    hf = load_hf(model, device)
    tokens, lengths = synthetic_cells(vocab, n_cells, mean_len, seed=1)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    rows = []
    for layer in (config.num_hidden_layers, config.num_hidden_layers - 1):
        ref = embed_hf(hf, tokens, lengths, layer, device, batch_size=16)
        ours32 = torch.cat(
            [
                mean_pool_padded(model.hidden_states(ids, layer=layer), ids != 0).cpu()
                for ids in torch.from_numpy(tokens).to(device).split(16)
            ]
        )

        def packed(ids, cu, longest, layer=layer):
            return bf16.hidden_states_packed(ids, cu, longest, layer=layer)

        ours16 = embed_packed(packed, tokens, lengths, device, budget)
        e_hf, e_bf16 = rel_err(ours32, ref), rel_err(ours16, ours32)
        ok = e_hf <= 1e-4 and e_bf16 <= 1e-2
        rows.append(f"| layer {layer} | {e_hf:.2e} | {e_bf16:.2e} | {'pass' if ok else 'FAIL'} |")
        print(rows[-1], flush=True)
    return rows


def time_hf(hf, tokens, lengths, layer, device, name):
    """Time transformers at batches of 100, halving the batch on out-of-memory."""
    batch = 100
    while True:
        try:
            embed_hf(hf, tokens[:batch], lengths[:batch], layer, device, batch)  # warm-up
            start = time.perf_counter()
            ref = embed_hf(hf, tokens, lengths, layer, device, batch)
            sync(device)
            return ref, time.perf_counter() - start, batch
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2
            print(f"{name}: transformers ran out of memory; batch size {batch}", flush=True)


def benchmark(name, config, vocab, device, n_cells, mean_len, budget, use_compile) -> list[str]:
    model = Geneformer.from_config(config, vocab, random_state=0).to(device).eval()
    layer = config.num_hidden_layers - 1  # Geneformer's default: the penultimate layer
    tokens, lengths = synthetic_cells(vocab, n_cells, mean_len)
    ref, seconds, batch = time_hf(load_hf(model, device), tokens, lengths, layer, device, name)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # transformers' model and activations are gone by now
    hf_rate = n_cells / seconds
    rows = [f"| {name} | transformers fp32 eager, batches of {batch} | {hf_rate:,.0f} | 1.00 | |"]
    print(rows[-1], flush=True)

    model = model.to(sgf.settings.resolve_dtype(device=device))

    def eager(ids, cu, longest):
        return model.hidden_states_packed(ids, cu, longest, layer=layer, validate=False)

    variants = [("packed eager", eager, None, "auto")]
    if device.type == "cuda":
        # FlashAttention-2 against cuDNN where torch offers both (torch 2.14 routes varlen_attn
        # to cuDNN on SM 9.x/10.x); "auto" is torch's own choice.
        variants += [(f"packed eager, backend {b}", eager, None, b) for b in ("flash", "cudnn")]
    if use_compile:
        # A fixed max_seqlen keeps one compiled graph for every batch.
        compiled = torch.compile(eager, dynamic=True)
        variants.append(("packed torch.compile", compiled, config.max_position_embeddings, "auto"))
    plan = execution_plan(device)
    for label, run, max_seqlen, backend in variants:
        with attention_backend(dataclasses.replace(plan, attention_backend=backend)):
            _, first_s = timed(
                partial(embed_packed, run, tokens[:256], lengths[:256], device, budget, max_seqlen),
                device,
            )
            ours, seconds = timed(
                partial(embed_packed, run, tokens, lengths, device, budget, max_seqlen), device
            )
        rate = n_cells / seconds
        dtype = str(model.dtype).removeprefix("torch.")
        rows.append(
            f"| {name} | ours {label} {dtype} (first call {first_s:.1f} s) | {rate:,.0f} | "
            f"{rate / hf_rate:.1f} | {rel_err(ours, ref):.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def run_section(name: str, section) -> tuple[list[str], bool]:
    """Run one part; a failure is reported in the table and does not stop the others."""
    try:
        rows = section()
        return rows, any("FAIL" in row for row in rows)
    except Exception as err:
        traceback.print_exc()
        return [f"| {name} | FAILED: {type(err).__name__}: {err} | | | |"], True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes; runs on a CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--cells-v1", type=int, default=5000)
    parser.add_argument("--cells-v2", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = sgf.settings.resolve_device()
    if device.type != "cuda" and not args.small:
        parser.error("no CUDA device: run with --small to exercise the code on a CPU")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    budget = sgf.settings.token_budget
    if args.small:
        models = [("tiny (V1 stand-in)", TINY, 60, 96), ("tiny (V2 stand-in)", TINY, 120, 48)]
        budget = 2048
    else:
        models = [
            ("V1-10M", PRESETS["V1-10M"], 1400, args.cells_v1),
            ("V2-104M", PRESETS["V2-104M"], 2800, args.cells_v2),
        ]
    vocabs = [synthetic_vocab(c.vocab_size, c.max_position_embeddings) for _, c, _, _ in models]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"# gpu_check: {gpu}, torch {torch.__version__}",
        "",
        f"Execution plan: {execution_plan(device).describe()}",
        "",
        f"## Accuracy ({models[0][0]}, random weights; max over cells of the relative error "
        "of mean-pooled embeddings)",
        "",
        "| layer | ours fp32 padded vs transformers fp32 | ours bf16 packed vs ours fp32 | |",
        "|---|---|---|---|",
    ]
    _, config, mean_len, _ = models[0]
    rows, failed = run_section(
        "accuracy", lambda: check_accuracy(config, vocabs[0], device, 64, mean_len, budget)
    )
    lines += [
        *rows,
        "",
        f"## Speed (cells/s, penultimate layer, token budget {budget:,})",
        "",
        "| model | how | cells/s | vs transformers | rel. error vs transformers |",
        "|---|---|---|---|---|",
    ]
    for (name, config, mean_len, n_cells), vocab in zip(models, vocabs, strict=True):
        rows, bad = run_section(
            name,
            partial(benchmark, name, config, vocab, device, n_cells, mean_len, budget, use_compile),
        )
        lines += rows
        failed |= bad
    out = args.out or Path(os.environ.get("OUT", "bench/_out")) / "gpu_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"\nwritten to {out}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
