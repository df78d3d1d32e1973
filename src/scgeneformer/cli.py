"""Command line: ``scgeneformer demo | tokenize | pretrain | finetune | embed | delete | env``.

The sub-commands: demo, tokenize, pretrain, finetune, embed, delete, overexpress, env.

Only argparse is imported here: torch, scanpy and the tools load when a command runs, so that
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._cli_errors import add_debug_flag, run_reporting_errors
from ._cli_finetune import add_finetune_command
from .analysis_cli import add_analysis_commands
from .env_cli import add_env_command
from .pretrain_cli import add_pretrain_command


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every default that is set (not the unset ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


class _RawHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The same, for a command whose description is laid out by hand."""


def _load_vocabulary(args: argparse.Namespace):
    from .vocab import Vocabulary

    if args.vocab is not None:
        return Vocabulary.load(args.vocab)
    if args.token_dict is None or args.median_dict is None:
        raise SystemExit("Give --vocab FILE.json, or --token-dict and --median-dict (pickles).")
    return Vocabulary.from_geneformer(args.token_dict, args.median_dict, args.mapping_dict)


def _tokenize(args: argparse.Namespace) -> int:
    import anndata as ad
    import numpy as np

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
    mapped = adata.uns["geneformer"]["n_genes_mapped"]
    print(
        f"{mapped:,} of {adata.n_vars:,} genes matched the vocabulary {vocab.name!r}; "
        f"{adata.n_obs:,} cells tokenized, {np.mean(n):.0f} tokens per cell -> {args.output}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoConfig, run_demo

    if args.data is None and (args.state_key, args.start, args.goal, args.subsample) != (
        "state",
        "disease",
        "healthy",
        None,
    ):
        raise SystemExit("--state-key, --start, --goal and --subsample go with --data FILE.h5ad.")
    config = DemoConfig(
        output=Path(args.output),
        data=None if args.data is None else Path(args.data),
        state_key=args.state_key,
        start=args.start,
        goal=args.goal,
        subsample=args.subsample,
        n_cells=args.n_cells,
        pretrain_steps=args.pretrain_steps,
        finetune_epochs=args.finetune_epochs,
        deletion_cells=args.deletion_cells,
        seed=args.seed,
    )
    run_demo(config)
    return 0


def _add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole workflow on synthetic data (or --data), with a report",
        description="Tokenize, pretrain a small model, embed, fine-tune a state classifier and "
        "screen in silico deletions; writes report.md, figures, ranked_genes.csv, cells.h5ad "
        "and the models to --output (a second run replaces them). About 5 minutes on 2 CPU "
        "cores with the defaults.",
    )
    demo.add_argument("--output", default="demo_out", help="folder for the report and results")
    demo.add_argument("--data", help="an h5ad of raw counts instead of the synthetic data")
    demo.add_argument("--state-key", default="state", help="obs column of cell states")
    demo.add_argument("--start", default="disease", help="state whose cells lose genes")
    demo.add_argument("--goal", default="healthy", help="state to move toward")
    demo.add_argument(
        "--subsample", type=int, help="with --data: use this many cells, drawn at random"
    )
    demo.add_argument("--n-cells", type=int, default=2000, help="synthetic cells to simulate")
    demo.add_argument("--pretrain-steps", type=int, default=300, help="masked-gene steps")
    demo.add_argument("--finetune-epochs", type=int, default=6, help="classifier epochs")
    demo.add_argument(
        "--deletion-cells", type=int, default=40, help="start cells to screen (every gene each)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    demo.set_defaults(run=_demo)


def _add_tokenize_command(commands: argparse._SubParsersAction) -> None:
    tok = commands.add_parser(
        "tokenize",
        help="rank-value tokenize an h5ad file",
        description="Rank-value tokenize the cells of an h5ad file with a saved vocabulary or "
        "the official Geneformer dictionaries. For V1 (gc30M) use token_dictionary_gc30M.pkl, "
        "gene_median_dictionary_gc30M.pkl and, for gene symbols, gene_name_id_dict_gc30M.pkl; "
        "for V2 the *_gc104M.pkl files.",
    )
    tok.add_argument("input", help="h5ad with raw counts")
    tok.add_argument("output", help="h5ad to write, with the token slots")
    tok.add_argument("--vocab", help="vocabulary JSON written by Vocabulary.save")
    tok.add_argument("--token-dict", help="official token_dictionary_*.pkl")
    tok.add_argument("--median-dict", help="official gene_median_dictionary_*.pkl")
    tok.add_argument(
        "--mapping-dict",
        help="official gene_name_id_dict_*.pkl (symbols) or ensembl_mapping_dict_*.pkl, of the "
        "same generation as the token dictionary",
    )
    tok.add_argument("--layer", help="layer of raw counts (default: X)")
    tok.add_argument("--gene-key", help="var column of gene IDs (default: var_names)")
    tok.add_argument("--max-length", type=int, help="tokens per cell (default: the vocabulary's)")
    tok.add_argument("--n-jobs", type=int, help="worker threads (default: all cores)")
    tok.set_defaults(run=_tokenize)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``scgeneformer`` argument parser.

    Examples
    --------
    >>> build_parser().parse_args(["demo"]).output
    'demo_out'
    """
    parser = argparse.ArgumentParser(prog="scgeneformer", description="Geneformer on AnnData.")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_command(commands)
    _add_tokenize_command(commands)
    add_pretrain_command(commands)
    add_finetune_command(commands)
    add_analysis_commands(commands)
    add_env_command(commands)
    for command in commands.choices.values():
        raw = issubclass(command.formatter_class, argparse.RawDescriptionHelpFormatter)
        command.formatter_class = _RawHelpFormatter if raw else _HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scgeneformer`` command.

    An ordinary mistake (a missing file, an unknown state, ...) prints one line,
    ``error: ...``, to stderr and returns 2; ``scgeneformer --debug COMMAND`` shows the
    traceback instead.

    Examples
    --------
    >>> main(["demo", "--output", "demo_out"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args)


if __name__ == "__main__":
    sys.exit(main())
