"""Command line: ``scgeneformer demo | tokenize | pretrain | embed | delete | env``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .analysis_cli import add_analysis_commands
from .env_cli import add_env_command
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


def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoConfig, run_demo

    if args.data is None and (args.state_key, args.start, args.goal) != (
        "state",
        "disease",
        "healthy",
    ):
        raise SystemExit("--state-key, --start and --goal go with --data FILE.h5ad.")
    config = DemoConfig(
        output=Path(args.output),
        data=None if args.data is None else Path(args.data),
        state_key=args.state_key,
        start=args.start,
        goal=args.goal,
        n_cells=args.n_cells,
        pretrain_steps=args.pretrain_steps,
        finetune_epochs=args.finetune_epochs,
        deletion_cells=args.deletion_cells,
        seed=args.seed,
    )
    run_demo(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``scgeneformer`` argument parser."""
    parser = argparse.ArgumentParser(prog="scgeneformer", description="Geneformer on AnnData.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="the whole workflow on embedded synthetic data (or --data), with a report"
    )
    demo.add_argument("--output", default="demo_out", help="folder for the report")
    demo.add_argument("--data", help="an h5ad with raw counts instead of the synthetic data")
    demo.add_argument("--state-key", default="state", help="obs column of cell states")
    demo.add_argument("--start", default="disease", help="state to delete genes in")
    demo.add_argument("--goal", default="healthy", help="state to move toward")
    demo.add_argument("--n-cells", type=int, default=2000, help="synthetic cells")
    demo.add_argument("--pretrain-steps", type=int, default=300)
    demo.add_argument("--finetune-epochs", type=int, default=6)
    demo.add_argument("--deletion-cells", type=int, default=40)
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
    add_analysis_commands(commands)
    add_env_command(commands)
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
