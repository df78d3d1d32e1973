"""``tl.pretrain``: masked-gene pretraining on one device or many (torchrun), resumable.

The loop lives in :mod:`scgeneformer.train._pretrain_loop`; this module checks the
arguments, reads the cells' tokens and drives a run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anndata import AnnData

from .._settings import settings
from ..data._masking import GeneMasker
from ..data._sources import PaddedTokens
from ..model import Geneformer
from ..train._distributed import setup_distributed
from ..train._optim import resolve_device_dtype, seed_everything
from ..train._pretrain_loop import PretrainArguments, PretrainRun
from ._tokens import cell_tokens


def _check_arguments(model: Any, **args: Any) -> None:
    if not isinstance(model, Geneformer):
        raise TypeError(f"model must be a scgeneformer.Geneformer, got {type(model).__name__}.")
    if not model.has_mlm_head:
        raise ValueError(
            "The model has no MLM head (it was loaded from a fine-tuned classifier); pretrain "
            "a model built with Geneformer.from_config or loaded from a BertForMaskedLM folder."
        )
    positive = ("epochs", "save_every", "keep_last", "log_every", "gradient_accumulation_steps")
    for name in positive:
        if int(args[name]) < 1 or int(args[name]) != args[name]:
            raise ValueError(f"{name} must be a positive integer, got {args[name]!r}.")
    for name in ("max_steps", "token_budget"):
        if args[name] is not None and int(args[name]) < 1:
            raise ValueError(f"{name} must be a positive integer or None, got {args[name]!r}.")
    if not args["lr"] > 0:
        raise ValueError(f"lr must be positive, got {args['lr']!r}.")
    if args["weight_decay"] < 0 or args["warmup_steps"] < 0:
        raise ValueError("weight_decay and warmup_steps must not be negative.")
    if args["clip_norm"] is not None and not args["clip_norm"] > 0:
        raise ValueError(f"clip_norm must be positive or None, got {args['clip_norm']!r}.")
    if not 0.0 <= args["eval_fraction"] < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {args['eval_fraction']!r}.")


def pretrain(
    data: AnnData | str | os.PathLike | Sequence[str | os.PathLike],
    model: Geneformer,
    *,
    output_dir: str | os.PathLike,
    layer: str | None = None,
    gene_key: str | None = None,
    max_steps: int | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    warmup_steps: int = 10_000,
    token_budget: int | None = None,
    gradient_accumulation_steps: int = 1,
    mask_fraction: float = 0.15,
    clip_norm: float | None = 1.0,
    save_every: int = 1000,
    keep_last: int = 3,
    eval_fraction: float = 0.05,
    log_every: int = 50,
    resume: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    random_state: int = 0,
    progress: bool | None = None,
) -> Geneformer:
    """Pretrain a Geneformer by masked-gene modelling, as Theodoris et al. (2023) did.

    In every cell 15% of the gene tokens are chosen (never ``<pad>``, ``<cls>``, ``<eos>``);
    of those 80% become ``<mask>``, 10% a random gene and 10% stay, and the model predicts
    the original genes there (cross-entropy over the MLM head, which runs on those positions
    only; each masked gene weighs the same). The defaults are Geneformer V1's recipe: AdamW,
    learning rate 1e-3, weight decay 0.001, 10,000 warm-up steps then linear decay to 0,
    gradients clipped to norm 1.

    Batches hold cells of similar length up to a token budget. On CUDA they are packed
    without padding (varlen attention) under bfloat16 autocast; on the CPU they are padded
    and run in float32. A share of the cells (``eval_fraction``, at most 10,000) is held out;
    at every checkpoint and at the end the held-out masked-gene accuracy (top-1, with the same
    masks each time) is computed and logged next to the most-frequent-gene baseline.

    Under ``torchrun`` (or in any initialised ``torch.distributed`` group) this runs as
    DistributedDataParallel: NCCL on GPUs, gloo on CPUs, each process on its own batches of
    every step, the same number of steps everywhere. A step's global batch is
    ``processes x gradient_accumulation_steps`` consecutive batches of the epoch, so
    ``torchrun --nproc-per-node 2`` trains exactly as one process with
    ``gradient_accumulation_steps=2``. Rank 0 writes every file.

    Every ``save_every`` steps (and at the end) a checkpoint goes to
    ``output_dir/checkpoints/step-N``, written atomically (a crash while writing leaves the
    previous one intact), keeping the newest ``keep_last``. With ``resume=True`` training
    continues from the newest complete checkpoint with weights, optimizer, schedule, random
    states and data position restored: the result equals that of an uninterrupted run.
    ``max_steps``/``epochs`` may change on resume (the schedule then follows the new total);
    arguments that define the data or the optimisation may not, nor the model's architecture or
    vocabulary. The tokens are hashed once before training (the same pass refuses ids outside
    the vocabulary), so resuming on other or reordered cells is refused even when the cell and
    token counts agree.

    Parameters
    ----------
    data
        An AnnData with tokens (``obsm["geneformer_tokens"]`` from
        :func:`~scgeneformer.pp.rank_tokenize` with the model's vocabulary; made now if
        absent), or paths: h5ad files with raw counts (tokenized with the model's vocabulary
        into a token store at ``output_dir/token_store``, see
        :func:`~scgeneformer.data.build_token_store`), token-store folders, or
        Geneformer tokenized data sets (arrow folders; needs ``pyarrow``).
    model
        A model with an MLM head, e.g. ``Geneformer.from_config("V1-10M", vocab)``; trained
        in place.
    output_dir
        Run folder: checkpoints, ``history.json``, the final model (loadable with
        :meth:`~scgeneformer.Geneformer.from_pretrained`) and any token store. Checked for
        writing before anything else happens, and locked for the run's life: a second run
        into the same folder is refused, naming the host and process that hold it.
    layer, gene_key
        Where the counts and the gene ids are, for cells tokenized here (h5ad files, or an
        AnnData without tokens), as in :func:`~scgeneformer.pp.rank_tokenize`: a layer name
        (None: ``X``) and a ``var`` column (None: ``var_names``).
    max_steps
        Optimisation steps; overrides ``epochs``.
    epochs
        Passes over the training cells, when ``max_steps`` is None.
    lr, weight_decay, warmup_steps
        AdamW peak learning rate, weight decay (on weight matrices only), linear warm-up
        steps before the linear decay to 0.
    token_budget
        Tokens per batch and process (default ``sgf.settings.token_budget``); padded
        batches count their padding.
    gradient_accumulation_steps
        Batches per process summed into one step.
    mask_fraction
        Share of each cell's genes to predict.
    clip_norm
        Maximal gradient norm; None disables clipping.
    save_every, keep_last
        Checkpoint interval in steps, and how many checkpoints to keep.
    eval_fraction
        Share of the cells held out for evaluation (0 for none).
    log_every
        Steps between history entries (mean loss, learning rate, tokens/s).
    resume
        Continue from the newest checkpoint in ``output_dir`` (a fresh start, with a
        warning, when there is none). Without it, an ``output_dir`` with checkpoints is
        refused.
    device, dtype
        Default ``sgf.settings`` ("auto": CUDA with bfloat16 autocast when present, else CPU
        float32). Under torchrun each process uses GPU ``LOCAL_RANK``.
    random_state
        Seeds the split, batch order, masks, and the dropout of process r with
        ``random_state + r``.
    progress
        Show a progress bar with loss and tokens/s (default ``sgf.settings.progress``).

    Returns
    -------
    The trained model (on ``device``, in evaluation mode), its
    :attr:`~scgeneformer.Geneformer.training_args` holding the arguments and the history
    (``{"train": [{step, epoch, loss, lr, tokens_per_s}], "eval": [{step, loss, accuracy,
    frequency_baseline, n_masked}]}``), also written to ``output_dir/history.json`` and
    plotted by :func:`scgeneformer.pl.loss_curve`.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=500, random_state=0)
    >>> vocab = sgf.Vocabulary.build(adata, max_length=256)
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2,
    ...                                    max_position_embeddings=256, random_state=0)
    >>> model = sgf.tl.pretrain(adata, model, output_dir="run", max_steps=50,
    ...                         warmup_steps=5, save_every=25)  # doctest: +SKIP
    >>> sgf.pl.loss_curve(model, show=False)  # doctest: +SKIP
    """
    _check_arguments(
        model,
        max_steps=max_steps,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        token_budget=token_budget,
        gradient_accumulation_steps=gradient_accumulation_steps,
        clip_norm=clip_norm,
        save_every=save_every,
        keep_last=keep_last,
        eval_fraction=eval_fraction,
        log_every=log_every,
    )
    masker = GeneMasker(model.vocab, mask_fraction)
    device, dtype = resolve_device_dtype(device, dtype)
    ctx = setup_distributed(device)
    try:
        args = PretrainArguments(
            output_dir=Path(output_dir),
            dtype=dtype,
            lr=float(lr),
            weight_decay=float(weight_decay),
            warmup_steps=int(warmup_steps),
            token_budget=settings.token_budget if token_budget is None else int(token_budget),
            accumulation=int(gradient_accumulation_steps),
            clip_norm=clip_norm,
            save_every=int(save_every),
            keep_last=int(keep_last),
            eval_fraction=float(eval_fraction),
            log_every=int(log_every),
            seed=int(random_state),
            progress=settings.progress if progress is None else bool(progress),
            layer=layer,
            gene_key=gene_key,
        )
        trainer = PretrainRun(model, ctx, masker, args)
        try:
            trainer.open(_anndata_tokens(data, model, layer, gene_key), resume)
            trainer.plan(max_steps, epochs)
            if not (resume and trainer.restore()):
                seed_everything(args.seed + ctx.rank)
            return trainer.train()
        finally:
            trainer.close()
    finally:
        ctx.close()


def _anndata_tokens(data: Any, model: Geneformer, layer: str | None, gene_key: str | None) -> Any:
    """Read an AnnData's tokens (made now with the model's vocabulary if absent)."""
    if not isinstance(data, AnnData):
        return data
    if data.n_obs == 0:
        raise ValueError("The corpus is empty: the AnnData has no cells.")
    tokens, n_tokens = cell_tokens(data, model, layer=layer, gene_key=gene_key)
    return PaddedTokens(tokens, n_tokens, "an AnnData")


__all__ = ["pretrain"]
