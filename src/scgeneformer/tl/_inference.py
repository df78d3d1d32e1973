"""Running the encoder over many cells: token-budget batches, pooling, input order kept.

The execution plan (:mod:`scgeneformer._plan`) says how: cells packed without padding
(``varlen_attn`` or nested jagged SDPA) or length-sorted padded batches, in which dtype, and
whether through the compiled encoder. Either way the encoder stops at the layer read and
results come back in the cells' input order.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._plan import ExecutionPlan, attention_backend
from .._progress import progress_bar
from ..data._batching import cell_batch, token_budget_batches
from ..model import Geneformer
from ..model._encoder import dropout_disabled
from ..train._optim import autocast
from ._compiled import EncoderRunner

POOLINGS = ("mean", "cls")


def hidden_layer_index(model: Geneformer, emb_layer: int) -> int:
    """Turn Geneformer's layer convention into an index of the encoder's hidden states.

    As Geneformer's ``emb_layer``: 0 is the last layer, -1 the one before it, and so on down
    to ``-num_layers`` (the embedding layer's output).

    Examples
    --------
    >>> hidden_layer_index(model, -1) == model.num_layers - 1  # doctest: +SKIP
    True
    """
    if isinstance(emb_layer, bool) or not isinstance(emb_layer, int | np.integer):
        raise TypeError(f"emb_layer must be an integer, got {emb_layer!r}.")
    if not -model.num_layers <= emb_layer <= 0:
        raise ValueError(
            f"emb_layer={emb_layer} is out of range for a model with {model.num_layers} layers: "
            f"use 0 (last layer), -1 (second to last, Geneformer's default) ... "
            f"{-model.num_layers} "
            "(embeddings)."
        )
    return model.num_layers + int(emb_layer)


def check_pooling(model: Geneformer, pooling: str) -> None:
    """Refuse unknown poolings, and ``"cls"`` on a vocabulary without ``<cls>``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if pooling == "cls" and not model.vocab.has_cls:
        raise ValueError(
            f"pooling='cls' needs a <cls> token, and the vocabulary {model.vocab.name!r} has "
            "none (Geneformer V1 style). Use pooling='mean'."
        )


@dataclass
class Encoded:
    """Pooled cell embeddings and, optionally, per-token sums for gene embeddings."""

    cells: np.ndarray
    gene_sum: np.ndarray | None
    gene_count: np.ndarray | None


@contextlib.contextmanager
def inference_on(model: torch.nn.Module, plan: ExecutionPlan) -> Iterator[None]:
    """Run the model without dropout on the plan's device, precision and SDPA backend.

    Dropout is switched off for the calling thread only (:func:`dropout_disabled`), never by
    ``model.eval()``: the train/eval flag is one attribute every thread reads, so flipping it
    here would let another thread's embedding run with dropout, or stop a training thread's.
    """
    if model.device != plan.device:
        model.to(plan.device)
    with (
        torch.inference_mode(),
        dropout_disabled(),
        autocast(plan.device, plan.dtype),
        attention_backend(plan),
    ):
        yield


def _gene_mask(ids: torch.Tensor, model: Geneformer) -> torch.Tensor:
    special = torch.tensor(
        list(model.vocab.special_tokens.values()), device=ids.device, dtype=ids.dtype
    )
    return ~torch.isin(ids, special)


def _warn_if_not_finite(pooled: np.ndarray, desc: str) -> None:
    """Warn when cells with tokens pooled to NaN or inf (cells without tokens are NaN by design)."""
    bad = int((~np.isfinite(pooled).all(axis=1)).sum())
    if bad:
        warnings.warn(
            f"{bad:,} of {len(pooled):,} cells with tokens pooled to a non-finite embedding "
            f"(NaN or inf) while {desc}. The model's weights or activations are not finite: "
            "check the checkpoint (torch.isfinite over model.state_dict()), and run in float32 "
            "(dtype='float32') if a 16-bit dtype overflowed.",
            UserWarning,
            stacklevel=3,
        )


def encode_cells(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    *,
    emb_layer: int,
    pooling: str,
    plan: ExecutionPlan,
    token_budget: int | None = None,
    genes: bool = False,
    packed: bool | None = None,
    desc: str = "embedding",
) -> Encoded:
    """Pool each cell's hidden states at ``emb_layer``; cells without tokens get NaN rows.

    Parameters
    ----------
    model
        The encoder, moved to ``device`` for the call.
    tokens, n_tokens
        Right-padded token rows and their lengths (the tokenization slots).
    emb_layer
        Geneformer's convention (see :func:`hidden_layer_index`).
    pooling
        ``"mean"`` over gene tokens (``<cls>``/``<eos>`` excluded) or ``"cls"``.
    plan
        Where, how and in which precision to run (16-bit dtypes through autocast, so the
        model's own weights stay as they are); see :func:`scgeneformer._plan.execution_plan`.
    token_budget
        Tokens per batch (default ``sgf.settings.token_budget``).
    genes
        Also sum each token's hidden state over cells (for gene embeddings).
    packed
        Pack cells without padding; default: where the plan does (a padded plan then runs
        the packed cells through the padded stand-in).
    desc
        Progress bar label.

    Returns
    -------
    :class:`Encoded` with ``cells`` ``(n_cells, hidden)`` float32 in input order.
    """
    index = hidden_layer_index(model, emb_layer)
    check_pooling(model, pooling)
    packed = plan.packed if packed is None else packed
    device = plan.device
    n_cells, hidden = len(n_tokens), model.hidden_size
    cells = np.full((n_cells, hidden), np.nan, dtype=np.float32)
    present = np.flatnonzero(n_tokens > 0)
    batches = token_budget_batches(n_tokens[present], token_budget, padded=not packed)
    if genes:  # a vocabulary-by-hidden float64 table: only when gene embeddings are asked for
        gene_sum = torch.zeros((len(model.vocab), hidden), dtype=torch.float64, device=device)
        gene_count = torch.zeros(len(model.vocab), dtype=torch.int64, device=device)
    bar = progress_bar(total=len(present), desc=desc, unit="cells")
    run = EncoderRunner(model, plan)
    with inference_on(model, plan), bar:
        for batch in batches:
            rows = present[batch]
            cells_batch = cell_batch(tokens[rows], n_tokens[rows], packed=packed, device=device)
            ids = cells_batch.ids
            if packed:
                cu = cells_batch.cu_seqlens
                states = run.packed(ids, cu, cells_batch.max_seqlen, layer=index)
                cell_of = torch.repeat_interleave(
                    torch.arange(len(rows), device=device),
                    torch.as_tensor(n_tokens[rows], device=device),
                )
                first = cu[:-1].long()
            else:
                states = run.padded(ids, cells_batch.mask, layer=index)
                cell_of = torch.arange(len(rows), device=device)[:, None].expand_as(ids)
                first = None
            gene = _gene_mask(ids, model)
            states = states.float()
            if pooling == "cls":
                pooled = states[first] if packed else states[:, 0]
            else:
                sums = torch.zeros((len(rows), hidden), device=device)
                sums.index_add_(0, cell_of[gene], states[gene])
                counts = torch.bincount(cell_of[gene], minlength=len(rows)).clamp_min(1)
                pooled = sums / counts[:, None]
            cells[rows] = pooled.cpu().numpy()
            if genes:
                gene_sum.index_add_(0, ids[gene], states[gene].double())
                gene_count += torch.bincount(ids[gene], minlength=len(model.vocab))
            bar.update(len(rows))
    _warn_if_not_finite(cells[present], desc)
    if not genes:
        return Encoded(cells, None, None)
    return Encoded(cells, gene_sum.cpu().numpy(), gene_count.cpu().numpy())
