"""``scgeneformer embed`` and ``scgeneformer delete``: the two tools most runs end in, on files."""

from __future__ import annotations

import argparse
from pathlib import Path


def _read_cells(args: argparse.Namespace):
    """Read the input h5ad and the model; tokenize the cells with its vocabulary if needed.

    Tokens already in the file must come from the model's vocabulary; the tools refuse others.
    """
    import anndata as ad

    from .model import Geneformer
    from .pp import rank_tokenize

    model = Geneformer.from_pretrained(args.model)
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


def _delete(args: argparse.Namespace) -> int:
    from .tl import in_silico_delete

    adata, model = _read_cells(args)
    in_silico_delete(
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
        n_background=args.n_background,
        key_added=args.key_added,
        store_per_cell=args.per_cell,
        device=args.device,
        random_state=args.seed,
    )
    adata.write_h5ad(args.output)
    columns = [c for c in adata.var.columns if c.startswith(f"{args.key_added}_")]
    table = adata.var[columns].dropna(subset=[f"{args.key_added}_zscore"])
    table = table.sort_values(f"{args.key_added}_zscore", ascending=False)
    if args.table is not None:
        table.to_csv(args.table)
    fdr = table[f"{args.key_added}_fdr"].to_numpy()[:10]
    top = ", ".join(f"{g} (FDR {q:.2g})" for g, q in zip(table.index[:10], fdr, strict=True))
    print(
        f"{len(table):,} genes ranked over {adata.uns[args.key_added]['n_start_cells']} "
        f"'{args.start}' cells -> {args.output}"
        + ("" if args.table is None else f" and {args.table}")
        + f"; top by z-score ({adata.uns[args.key_added]['alternative']}): {top}"
    )
    return 0


def _common_options(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("input", help="h5ad with raw counts, or already tokenized")
    command.add_argument("output", help=f"h5ad to write, with {what}")
    command.add_argument("--model", required=True, help="a saved model folder")
    command.add_argument(
        "--layer", type=int, default=-1, help="layer read: -1 second-to-last (default), 0 last"
    )
    command.add_argument(
        "--counts-layer", help="layer of raw counts when the file is not tokenized yet"
    )
    command.add_argument("--gene-key", help="var column of gene IDs (default: var_names)")
    command.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the setting)")


def add_analysis_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed`` and ``delete`` to the ``scgeneformer`` command line.

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
    embed.add_argument("--key-added", default="X_geneformer")
    embed.add_argument("--pooling", default="mean", choices=("mean", "cls"))
    embed.add_argument("--genes", action="store_true", help="also gene embeddings into varm")
    embed.set_defaults(run=_embed)

    delete = subparsers.add_parser(
        "delete", help="in silico deletion screen: genes ranked by the shift toward a goal state"
    )
    _common_options(delete, "the var columns of the screen")
    delete.add_argument("--state-key", required=True, help="obs column of cell states")
    delete.add_argument("--start", required=True, help="state whose cells lose genes")
    delete.add_argument("--goal", required=True, help="state to move toward")
    delete.add_argument("--alt", nargs="*", default=[], help="other states to measure")
    delete.add_argument("--genes", nargs="+", help="genes to delete (default: every gene)")
    delete.add_argument("--max-cells", type=int, help="start cells to screen at most")
    delete.add_argument("--min-cells", type=int, default=3, help="cells a gene needs to be tested")
    delete.add_argument(
        "--alternative",
        default="greater",
        choices=("greater", "less", "two-sided"),
        help="test direction: greater = deletion moves cells toward the goal (default)",
    )
    delete.add_argument(
        "--n-background", type=int, default=200, help="background genes beside a --genes list"
    )
    delete.add_argument("--key-added", default="in_silico_delete")
    delete.add_argument("--per-cell", action="store_true", help="also the per-cell layer")
    delete.add_argument("--table", type=Path, help="CSV of the ranked genes")
    delete.add_argument("--seed", type=int, default=0, help="which cells --max-cells picks")
    delete.set_defaults(run=_delete)
