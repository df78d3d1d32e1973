"""The fine-tuning loop: a classifier trained over shuffled token-budget batches of cells.

The cell and gene tasks (:mod:`scgeneformer.tl._finetune_cells`,
:mod:`scgeneformer.tl._finetune_genes`) differ only in their loss and their evaluation; both
hand them to :func:`fit_classifier`, with the options of one :class:`FitOptions`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from .._plan import execution_plan
from .._progress import progress_bar
from .._settings import settings
from ..data._batching import cell_batch, token_budget_batches
from ..model._classifier import GeneformerClassifier
from ..model._lora import LoraOptions
from ._history import Records, empty_history
from ._lr_range import lr_range_test
from ._optim import adamw, autocast, linear_warmup_decay, loss_scaler, trainable_state

logger = logging.getLogger("scgeneformer")

MAX_GRAD_NORM = 1.0  # transformers' Trainer default, which Geneformer fine-tunes with
# As transformers' length-grouped sampler: shuffle, then sort by length within chunks of about
# 50 batches, so batches are both random and low in padding.
_MEGABATCH_BATCHES = 50
# A backward pass keeps every layer's activations, so training batches take at most a quarter
# of the token budget that inference uses.
TRAIN_BUDGET_SHARE = 4
# Batches are sized from the data (when no budget is given) so that an epoch has at least
# this many optimiser steps: on a few hundred cells the token budget would otherwise make an
# epoch one or two steps, and a classifier would not learn in ten epochs.
_MIN_STEPS_PER_EPOCH = 32

LossFn = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]
Evaluate = Callable[[], tuple[float, float]]


@dataclass(frozen=True)
class FitOptions:
    """How a classifier is fitted: the knobs of :func:`scgeneformer.tl.finetune`, checked."""

    freeze_layers: int
    epochs: int
    lr: float | Literal["auto"]
    weight_decay: float
    train_budget: int | None  # None: sized from the data (auto_token_budget)
    eval_budget: int
    class_weight: str | None
    random_state: int
    device: torch.device
    dtype: torch.dtype
    warmup_fraction: float = 0.1
    adapter: LoraOptions | None = None  # None: every weight trains
    quantize: str | None = None  # "4bit" / "8bit": the frozen base under the adapter

    def params(self, **extra: Any) -> dict[str, Any]:
        """Plain values, for ``uns`` and the saved classifier's training arguments."""
        params = asdict(self)
        # Recorded only when used (h5ad stores no None), the adapter as plain lists.
        del params["adapter"], params["quantize"]
        if self.adapter is not None:
            params["adapter"] = {"type": "lora", **self.adapter.as_dict()}
        if self.quantize is not None:
            params["quantize"] = self.quantize
        params["device"] = str(self.device)
        params["dtype"] = str(self.dtype).removeprefix("torch.")
        if params["train_budget"] is None:
            params["train_budget"] = "auto"  # h5ad stores no None
        params["execution_plan"] = execution_plan(self.device, self.dtype, log=False).as_dict()
        return {**params, **extra}


def auto_token_budget(n_tokens: np.ndarray, cap: int) -> int:
    """Training batch size in tokens for cells of these lengths: about 32 steps an epoch.

    ``1 / _MIN_STEPS_PER_EPOCH`` of the cells' tokens, at most ``cap`` and at least the longest
    cell, so a small data set still gets enough optimiser steps to learn from.

    Examples
    --------
    >>> auto_token_budget(np.full(600, 256), cap=16_384)
    4800
    >>> auto_token_budget(np.full(100_000, 2048), cap=16_384)
    16384
    """
    wanted = -(-int(n_tokens.sum()) // _MIN_STEPS_PER_EPOCH)
    return int(max(min(wanted, cap), int(n_tokens.max(initial=1))))


def classifier_logits(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    rows: np.ndarray,
    packed: bool,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the cells ``rows`` and their real tokens' ids, flattened in cell order.

    Cell task: ``(cells, n_classes)``; gene task: ``(tokens, n_classes)`` aligned with the ids.
    """
    batch = cell_batch(tokens[rows], n_tokens[rows], packed=packed, device=clf.device)
    logits = clf(**batch.inputs(), validate=validate)
    if clf.task == "gene" and not batch.packed:
        logits = logits[batch.mask]
    return logits, batch.real_ids


def shuffled_length_batches(
    n_tokens: np.ndarray,
    cells: np.ndarray,
    budget: int,
    packed: bool,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One epoch of training batches: random, yet of similar lengths within each batch."""
    order = rng.permutation(cells)
    per_batch = max(1, budget // max(int(np.median(n_tokens[cells])), 1))
    chunk_size = _MEGABATCH_BATCHES * per_batch
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = order[start : start + chunk_size]
        batches += [
            chunk[b] for b in token_budget_batches(n_tokens[chunk], budget, padded=not packed)
        ]
    return [batches[i] for i in rng.permutation(len(batches))]


def _train_step(
    clf: GeneformerClassifier,
    optimizer: torch.optim.Optimizer,
    batch: np.ndarray,
    *,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    loss_fn: LossFn,
    trainable: list[torch.nn.Parameter],
    packed: bool,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler,
) -> float:
    """One optimiser step on the cells ``batch``; returns the batch's loss."""
    with autocast(device, dtype):
        logits, ids = classifier_logits(clf, tokens, n_tokens, batch, packed, validate=False)
    loss = loss_fn(batch, logits.float(), ids)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def fit_classifier(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    cells: np.ndarray,
    loss_fn: LossFn,
    options: FitOptions,
    *,
    rng: np.random.Generator,
    evaluate: Evaluate | None,
    patience: int | None,
    desc: str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Records]:
    """Train ``clf`` on ``cells``; keep the epoch with the best validation score if evaluated.

    The token ids were checked once when the cells' tokens were read, so the steps skip the
    per-batch check (a device sync each). ``options.train_budget=None`` sizes the batches
    with :func:`auto_token_budget`; ``options.lr="auto"`` takes the peak learning rate from a
    range test (:func:`~scgeneformer.train._lr_range.lr_range_test`) on the first epoch's
    batches. An epoch counts as better when its validation macro-F1 is higher, or equal with
    a lower validation loss (so a model still at chance level but learning is not stopped
    early). ``on_epoch(epoch, val_macro_f1)`` is called after each evaluation (a search
    prunes trials there, by raising).

    Returns the history (:mod:`~scgeneformer.train._history`): per epoch a training record
    (``epoch``, ``step``, mean ``loss``, the run's ``peak_lr`` and ``token_budget``) and,
    when ``evaluate`` is given, an evaluation record (validation ``loss`` and ``macro_f1``).
    """
    dropout = clf.encoder.config.attention_probs_dropout_prob
    plan = execution_plan(options.device, options.dtype, training=True, attention_dropout=dropout)
    device, dtype, packed = plan.device, plan.dtype, plan.packed
    clf.to(device)
    budget = options.train_budget
    if budget is None:
        budget = auto_token_budget(n_tokens[cells], settings.token_budget // TRAIN_BUDGET_SHARE)
    batches = shuffled_length_batches(n_tokens, cells, budget, packed, rng)
    trainable = [p for p in clf.parameters() if p.requires_grad]
    clf.encoder.check_token_ids(torch.as_tensor(tokens[cells].astype(np.int64)))
    step_on = functools.partial(
        _train_step,
        clf,
        tokens=tokens,
        n_tokens=n_tokens,
        loss_fn=loss_fn,
        trainable=trainable,
        packed=packed,
        device=device,
        dtype=dtype,
    )
    lr = options.lr
    if lr == "auto":
        clf.train()
        lr, _ = lr_range_test(
            clf,
            batches,
            functools.partial(step_on, scaler=loss_scaler(plan)),
            lambda rate: adamw(clf, rate, options.weight_decay),
        )
        logger.info(f"{desc}: learning-rate range test chose a peak rate of {lr:.2e}.")
    # Its own scaler: the range test's high rates may have shrunk the loss scale.
    train_step = functools.partial(step_on, scaler=loss_scaler(plan))
    optimizer = adamw(clf, lr, options.weight_decay)
    total_steps = options.epochs * len(batches)
    warmup = round(options.warmup_fraction * total_steps)
    scheduler = linear_warmup_decay(optimizer, warmup, total_steps)
    history = empty_history()
    best, best_state, stale, step = (-np.inf, 0.0), None, 0, 0
    with progress_bar(total=total_steps, desc=desc, unit="steps") as bar:
        for epoch in range(1, options.epochs + 1):
            if epoch > 1:  # the first epoch's batches were drawn to count the steps
                batches = shuffled_length_batches(n_tokens, cells, budget, packed, rng)
            clf.train()
            losses = []
            for batch in batches:
                losses.append(train_step(optimizer, batch))
                scheduler.step()
                step += 1
                bar.update()
            history["train"].append(
                {
                    "epoch": epoch,
                    "step": step,
                    "loss": float(np.mean(losses)),
                    "peak_lr": float(lr),
                    "token_budget": int(budget),
                }
            )
            message = f"{desc} epoch {epoch}: loss {history['train'][-1]['loss']:.4f}"
            if evaluate is not None:
                val_loss, score = evaluate()
                history["eval"].append(
                    {"epoch": epoch, "step": step, "loss": val_loss, "macro_f1": score}
                )
                message += f", validation loss {val_loss:.4f}, macro-F1 {score:.4f}"
                if on_epoch is not None:
                    on_epoch(epoch, score)
                if (score, -val_loss) > best:
                    best, stale = (score, -val_loss), 0
                    best_state = trainable_state(clf)
                else:
                    stale += 1
            logger.info(message)
            if patience is not None and stale >= patience:
                logger.info(f"{desc}: no validation gain in {patience} epochs; stopping early.")
                break
    if best_state is not None:
        clf.load_state_dict(best_state, strict=False)  # the frozen weights never changed
    return history
