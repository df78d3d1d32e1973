"""``scgeneformer embed``, ``delete`` and ``overexpress``: the tools most runs end in, on files."""

from __future__ import annotations

import argparse
from pathlib import Path


def load_model(folder: str | Path):
    """Load a saved model folder as what it holds: a classifier, or an encoder.

    Examples
    --------
    >>> clf = load_model("demo_out/classifier")  # doctest: +SKIP
    """
    from .model import Geneformer, GeneformerClassifier
    from .model._classifier import ARCHITECTURES
    from .model._hf_folder import CONFIG_NAME, read_json

    config = Path(folder) / CONFIG_NAME
    if config.is_file():
        architectures = read_json(config, "Model config").get("architectures") or []
        if set(architectures) & set(ARCHITECTURES.values()):
            return GeneformerClassifier.from_pretrained(folder)
    return Geneformer.from_pretrained(folder)


def _read_cells(args: argparse.Namespace):
    """Read the input h5ad and the model; tokenize the cells with its vocabulary if needed.

    Tokens already in the file must come from the model's vocabulary; the tools refuse others.
    """
    import anndata as ad

    from .pp import rank_tokenize

    model = load_model(args.model)
    adata = ad.read_h5ad(args.input)
    if "geneformer_tokens" not in adata.obsm:
        # The tools would tokenize X themselves; this passes the counts layer and gene key.
        rank_tokenize(adata, model.vocab, layer=args.counts_layer, gene_key=args.gene_key)
    return adata, model


def _embed(args: argparse.Namespace) -> int:
    from .tl import embed

    adata, model = _read_cells(args)
    embed(
        adata,
        model,
        key_added=args.key_added,
        emb_layer=args.layer,
        pooling=args.pooling,
        genes=args.genes,
        device=args.device,
    )
    adata.write_h5ad(args.output)
    width = adata.obsm[args.key_added].shape[1]
    print(f"{adata.n_obs:,} cells embedded ({width} dimensions) -> {args.output}")
    return 0


def _screen(args: argparse.Namespace) -> int:
    from . import tl
    from ._screen_table import screen_table

    adata, model = _read_cells(args)
    tool = getattr(tl, args.tool)
    tool(
        adata,
        model,
        state_key=args.state_key,
        start_state=args.start,
        goal_state=args.goal,
        alt_states=args.alt,
        genes="all" if args.genes is None else args.genes,
        max_cells=args.max_cells,
        emb_layer=args.layer,
        min_cells=args.min_cells,
        alternative=args.alternative,
        n_null_genes=args.n_null_genes,
        key_added=args.key_added,
        store_per_cell=args.per_cell,
        device=args.device,
        random_state=args.seed,
    )
    adata.write_h5ad(args.output)
    table = screen_table(adata, args.key_added)
    if args.table is not None:
        table.to_csv(args.table, index_label="var_name")
    tested = table[table["tested"]].head(10)
    top = ", ".join(f"{g} (FDR {q:.2g})" for g, q in zip(tested.index, tested["fdr"], strict=True))
    n_ranked, n_cells = int(table["tested"].sum()), adata.uns[args.key_added]["n_start_cells"]
    print(
        f"{n_ranked:,} genes ranked over {n_cells} "
        f"'{args.start}' cells -> {args.output}"
        + ("" if args.table is None else f" and {args.table}")
        + f"; top by z-score ({adata.uns[args.key_added]['alternative']}): {top}"
    )
    return 0


def _common_options(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("input", help="h5ad with raw counts, or already tokenized")
    command.add_argument("output", help=f"h5ad to write, with {what}")
    command.add_argument(
        "--model", required=True, help="a saved model or classifier folder (HF layout)"
    )
    command.add_argument(
        "--layer", type=int, default=-1, help="layer read: -1 the second-to-last, 0 the last"
    )
    command.add_argument(
        "--counts-layer", help="layer of raw counts when the file is not tokenized yet"
    )
    command.add_argument("--gene-key", help="var column of gene IDs (default: var_names)")
    command.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the setting)")


def add_analysis_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed``, ``delete`` and ``overexpress`` to the ``scgeneformer`` command line.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> add_analysis_commands(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["embed", "in.h5ad", "out.h5ad", "--model", "m"]).layer
    -1
    """
    embed = subparsers.add_parser(
        "embed", help="cell (and gene) embeddings of an h5ad file into obsm (varm)"
    )
    _common_options(embed, "obsm[KEY_ADDED]")
    embed.add_argument("--key-added", default="X_geneformer", help="obsm key of the embedding")
    embed.add_argument(
        "--pooling", default="mean", choices=("mean", "cls"), help="mean of genes, or <cls>"
    )
    embed.add_argument("--genes", action="store_true", help="also gene embeddings into varm")
    embed.set_defaults(run=_embed)

    for command, action in (("delete", "deletion"), ("overexpress", "overexpression")):
        _add_screen_command(subparsers, command, action)


def _add_screen_command(subparsers: argparse._SubParsersAction, command: str, action: str) -> None:
    screen = subparsers.add_parser(
        command,
        help=f"in silico {action} screen: genes ranked by the shift toward a goal state",
        description=f"In silico {action} of every gene (or --genes) in start-state cells, "
        "ranked by the rank-adjusted z-score of the shift toward the goal state. Screen with "
        "the classifier from `scgeneformer finetune --label-key STATE_KEY` (a pretrained "
        "model gets a warning).",
    )
    _common_options(screen, "the var columns of the screen")
    screen.add_argument("--state-key", required=True, help="obs column of cell states")
    screen.add_argument("--start", required=True, help="state whose cells are perturbed")
    screen.add_argument("--goal", required=True, help="state to move toward")
    screen.add_argument("--alt", nargs="*", default=[], help="other states to measure")
    screen.add_argument("--genes", nargs="+", help="genes to perturb (default: every gene)")
    screen.add_argument("--max-cells", type=int, help="start cells to screen at most")
    screen.add_argument(
        "--min-cells", type=int, default=3, help="cells a gene needs to be tested and ranked"
    )
    screen.add_argument(
        "--alternative",
        default="greater",
        choices=("greater", "less", "two-sided"),
        help=f"test direction: greater = the {action} moves cells toward the goal",
    )
    screen.add_argument(
        "--n-null-genes", type=int, default=200, help="random null genes beside a --genes list"
    )
    screen.add_argument("--key-added", default=f"in_silico_{command}", help="prefix of the slots")
    screen.add_argument("--per-cell", action="store_true", help="also the per-cell layer")
    screen.add_argument(
        "--table", type=Path, help="CSV of the genes, by z-score; untested genes last"
    )
    screen.add_argument("--seed", type=int, default=0, help="which cells --max-cells picks")
    screen.set_defaults(run=_screen, tool=f"in_silico_{command}")
