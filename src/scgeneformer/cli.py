"""Command line: ``scgeneformer demo | tokenize | pretrain``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .pretrain_cli import add_pretrain_command


def _load_vocabulary(args: argparse.Namespace):
    from .vocab import Vocabulary

    if args.vocab is not None:
        return Vocabulary.load(args.vocab)
    if args.token_dict is None or args.median_dict is None:
        raise SystemExit("Give --vocab FILE.json, or --token-dict and --median-dict (pickles).")
    return Vocabulary.from_geneformer(args.token_dict, args.median_dict, args.mapping_dict)


def _tokenize(args: argparse.Namespace) -> int:
    import anndata as ad

    from .pp import rank_tokenize

    vocab = _load_vocabulary(args)
    adata = ad.read_h5ad(args.input)
    rank_tokenize(
        adata,
        vocab,
        layer=args.layer,
        gene_key=args.gene_key,
        max_length=args.max_length,
        n_jobs=args.n_jobs,
    )
    adata.write_h5ad(args.output)
    n = adata.obs["geneformer_n_tokens"].to_numpy()
    print(f"{adata.n_obs:,} cells tokenized, {np.mean(n):.0f} tokens per cell -> {args.output}")
    return 0


def token_position_summary(adata, genes: Sequence[str], state_key: str) -> dict[str, float]:
    """Median position of ``genes`` in the token lists of each state's cells (1 = first).

    Cells where a gene is absent are left out; positions count genes only (after ``<cls>``).
    """
    tokens = adata.obsm["geneformer_tokens"]
    gene_tokens = adata.var.loc[list(genes), "geneformer_token"].to_numpy()
    lead = 1 if adata.uns["geneformer"]["has_cls"] else 0
    out = {}
    for state in adata.obs[state_key].cat.categories:
        rows = tokens[(adata.obs[state_key] == state).to_numpy()]
        hits = np.isin(rows, gene_tokens)
        positions = np.nonzero(hits)[1] + 1 - lead
        out[str(state)] = float(np.median(positions)) if len(positions) else float("nan")
    return out


def _demo(args: argparse.Namespace) -> int:
    from .datasets import synthetic_states
    from .pp import rank_tokenize
    from .vocab import Vocabulary

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adata = synthetic_states(n_cells=args.n_cells, random_state=args.seed)
    print(f"[1/3] synthetic two-state data: {adata.n_obs:,} cells x {adata.n_vars:,} genes")
    vocab = Vocabulary.build(adata, name="synthetic-demo")
    vocab.save(out / "vocab.json")
    print(f"[2/3] {vocab!r}")
    rank_tokenize(adata, vocab)
    n = adata.obs["geneformer_n_tokens"].to_numpy()
    print(f"[3/3] tokenized: {n.mean():.0f} tokens per cell (min {n.min()}, max {n.max()})")
    drivers = adata.var_names[adata.var["gene_role"] == "driver"]
    positions = token_position_summary(adata, drivers, "state")
    lines = [
        "# scgeneformer demo",
        "",
        f"- data: `synthetic_states(n_cells={args.n_cells}, random_state={args.seed})`",
        f"- vocabulary: {vocab.n_genes} genes, sha256 `{vocab.sha256[:16]}`",
        f"- tokens per cell: mean {n.mean():.0f}, min {n.min()}, max {n.max()}",
        "",
        "Median position of the planted driver genes in each state's token lists "
        "(1 = the cell's top-ranked gene):",
        "",
        "| state | median driver position |",
        "|---|---|",
        *[f"| {state} | {pos:.0f} |" for state, pos in positions.items()],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    adata.write_h5ad(out / "tokenized.h5ad")
    for state, pos in positions.items():
        print(f"    drivers in {state} cells: median token position {pos:.0f}")
    print(f"done in {time.perf_counter() - start:.1f} s; report: {out / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``scgeneformer`` argument parser."""
    parser = argparse.ArgumentParser(prog="scgeneformer", description="Geneformer on AnnData.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main workflow on embedded synthetic data")
    demo.add_argument("--output", default="demo_out", help="folder for the report")
    demo.add_argument("--n-cells", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    tok = commands.add_parser("tokenize", help="rank-value tokenize an h5ad file")
    tok.add_argument("input", help="h5ad with raw counts")
    tok.add_argument("output", help="h5ad to write, with the token slots")
    tok.add_argument("--vocab", help="vocabulary JSON written by Vocabulary.save")
    tok.add_argument("--token-dict", help="official token_dictionary_*.pkl")
    tok.add_argument("--median-dict", help="official gene_median_dictionary_*.pkl")
    tok.add_argument("--mapping-dict", help="official ensembl_mapping_dict_*.pkl (optional)")
    tok.add_argument("--layer")
    tok.add_argument("--gene-key")
    tok.add_argument("--max-length", type=int)
    tok.add_argument("--n-jobs", type=int)
    tok.set_defaults(run=_tokenize)

    add_pretrain_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scgeneformer`` command.

    Examples
    --------
    >>> main(["demo", "--output", "demo_out"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
