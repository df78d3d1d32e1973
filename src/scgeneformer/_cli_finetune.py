"""``scgeneformer finetune``: a cell classifier from a saved model, on an h5ad file.

The classifier folder it writes is what ``scgeneformer delete --model`` and ``overexpress``
screen with, so the shell workflow is tokenize -> pretrain -> finetune -> delete.
"""

from __future__ import annotations

import argparse


def _finetune(args: argparse.Namespace) -> int:
    from .analysis_cli import _read_cells
    from .tl import finetune

    adata, model = _read_cells(args)
    clf = finetune(
        adata,
        model,
        label_key=args.label_key,
        group_key=args.group_key,
        test_size=args.test_size,
        val_size=args.val_size,
        freeze_layers=args.freeze_layers,
        epochs=args.epochs,
        lr=args.lr,
        token_budget=args.batch_tokens,
        baseline=not args.no_baseline,
        device=args.device,
        random_state=args.seed,
        **_adapter_arguments(args),
    )
    folder = clf.save(args.output)
    scores = adata.uns[f"{args.label_key}_finetune"]
    line = f"held-out accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}"
    if "baseline" in scores:
        line += f" (PCA + logistic regression: macro-F1 {scores['baseline']['macro_f1']:.3f})"
    if args.predictions is not None:
        from ._demo import _save_cells

        _save_cells(adata, args.predictions)
    print(
        f"{line}; classifier -> {folder}"
        + ("" if args.predictions is None else f", cells with predictions -> {args.predictions}")
    )
    return 0


def _adapter_arguments(args: argparse.Namespace) -> dict:
    """``adapter``, ``adapter_options`` and ``quantize`` of :func:`~scgeneformer.tl.finetune`."""
    given = {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "dropout": args.lora_dropout,
        "target_modules": args.lora_targets,
    }
    options = {k: v for k, v in given.items() if v is not None}
    return {"adapter": args.adapter, "adapter_options": options or None, "quantize": args.quantize}


def add_finetune_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``finetune INPUT OUTPUT --model FOLDER --label-key KEY`` to the command line.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> add_finetune_command(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["finetune", "in.h5ad", "clf", "--model", "m", "--label-key", "s"])
    >>> args.epochs, args.group_key
    (10, None)
    """
    command = subparsers.add_parser(
        "finetune",
        help="fine-tune a cell classifier (e.g. of disease state) from a saved model",
        description="Fine-tune a cell classifier from a saved Geneformer model: the cells are "
        "split into training, validation (early stopping) and test cells, stratified by label, "
        "or by --group-key (e.g. donor) so that no group is in two parts; the test cells are "
        "scored beside PCA + logistic regression. Writes the classifier folder, which "
        "`scgeneformer delete --model` screens with.",
    )
    command.add_argument("input", help="h5ad with raw counts, or already tokenized")
    command.add_argument("output", help="folder to write the classifier to")
    command.add_argument("--model", required=True, help="a saved model folder (HF layout)")
    command.add_argument("--label-key", required=True, help="obs column of the labels")
    command.add_argument("--group-key", help="obs column of groups (e.g. donor) kept apart")
    command.add_argument("--test-size", type=float, default=0.2, help="share of test cells")
    command.add_argument("--val-size", type=float, default=0.1, help="share of validation cells")
    command.add_argument("--freeze-layers", type=int, default=0, help="lowest layers not trained")
    command.add_argument("--epochs", type=int, default=10, help="at most this many epochs")
    command.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    command.add_argument(
        "--batch-tokens", type=int, help="tokens per training batch (default: from settings)"
    )
    command.add_argument("--no-baseline", action="store_true", help="skip the PCA baseline")
    command.add_argument(
        "--counts-layer", help="layer of raw counts when the file is not tokenized yet"
    )
    command.add_argument("--gene-key", help="var column of gene IDs (default: var_names)")
    command.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the setting)")
    command.add_argument(
        "--predictions",
        help="also write the cells (h5ad) with each cell's part of the split and the "
        "predictions of the test cells",
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    lora = command.add_argument_group(
        "LoRA",
        "train low-rank adapters on the frozen model instead of every weight (needs "
        "peft); the output folder then holds only the adapters and heads, and names --model "
        "as its base",
    )
    lora.add_argument("--adapter", choices=["lora"], help="train LoRA adapters")
    lora.add_argument("--lora-r", type=int, help="rank of the adapters (default 8)")
    lora.add_argument("--lora-alpha", type=float, help="scale alpha; updates are alpha/r*BA (16)")
    lora.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (0.1)")
    lora.add_argument(
        "--lora-targets",
        nargs="+",
        help="layers adapted: query key value (default) attention_output intermediate output",
    )
    lora.add_argument(
        "--quantize", choices=["4bit", "8bit"], help="hold the frozen model in 4 or 8 bits (CUDA)"
    )
    command.set_defaults(run=_finetune)
