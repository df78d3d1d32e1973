"""The fine-tuning loop: a classifier trained over shuffled token-budget batches of cells.

The cell and gene tasks (:mod:`scgeneformer.tl._finetune_cells`,
:mod:`scgeneformer.tl._finetune_genes`) differ only in their loss and their evaluation; both
hand them to :func:`fit_classifier`, with the options of one :class:`FitOptions`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .._plan import execution_plan
from .._progress import progress_bar
from ..data._batching import cell_batch, token_budget_batches
from ..model._classifier import GeneformerClassifier
from ._history import Records, empty_history
from ._optim import adamw, autocast, linear_warmup_decay, loss_scaler

logger = logging.getLogger("scgeneformer")

WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0  # transformers' Trainer default, which Geneformer fine-tunes with
# As transformers' length-grouped sampler: shuffle, then sort by length within chunks of about
# 50 batches, so batches are both random and low in padding.
_MEGABATCH_BATCHES = 50

LossFn = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]
Evaluate = Callable[[], tuple[float, float]]


@dataclass(frozen=True)
class FitOptions:
    """How a classifier is fitted: the knobs of :func:`scgeneformer.tl.finetune`, checked."""

    freeze_layers: int
    epochs: int
    lr: float
    weight_decay: float
    train_budget: int
    eval_budget: int
    class_weight: str | None
    random_state: int
    device: torch.device
    dtype: torch.dtype

    def params(self, **extra: Any) -> dict[str, Any]:
        """Plain values, for ``uns`` and the saved classifier's training arguments."""
        params = asdict(self)
        params["device"] = str(self.device)
        params["dtype"] = str(self.dtype).removeprefix("torch.")
        params["execution_plan"] = execution_plan(self.device, self.dtype, log=False).as_dict()
        return {**params, **extra}


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
) -> dict[str, Records]:
    """Train ``clf`` on ``cells``; keep the epoch with the best validation score if evaluated.

    The token ids were checked once when the cells' tokens were read, so the steps skip the
    per-batch check (a device sync each).

    Returns the history (:mod:`~scgeneformer.train._history`): per epoch a training record
    (``epoch``, ``step``, mean ``loss``) and, when ``evaluate`` is given, an evaluation record
    (validation ``loss`` and ``macro_f1``).
    """
    dropout = clf.encoder.config.attention_probs_dropout_prob
    plan = execution_plan(options.device, options.dtype, training=True, attention_dropout=dropout)
    device, dtype, packed = plan.device, plan.dtype, plan.packed
    clf.to(device)
    optimizer = adamw(clf, options.lr, options.weight_decay)
    scaler = loss_scaler(plan)
    budget = options.train_budget
    batches = shuffled_length_batches(n_tokens, cells, budget, packed, rng)
    total_steps = options.epochs * len(batches)
    scheduler = linear_warmup_decay(optimizer, round(WARMUP_FRACTION * total_steps), total_steps)
    trainable = [p for p in clf.parameters() if p.requires_grad]
    history = empty_history()
    clf.encoder.check_token_ids(torch.as_tensor(tokens[cells].astype(np.int64)))
    best_score, best_state, stale, step = -np.inf, None, 0, 0
    with progress_bar(total=total_steps, desc=desc, unit="steps") as bar:
        for epoch in range(1, options.epochs + 1):
            if epoch > 1:  # the first epoch's batches were drawn to count the steps
                batches = shuffled_length_batches(n_tokens, cells, budget, packed, rng)
            clf.train()
            losses = []
            for batch in batches:
                with autocast(device, dtype):
                    logits, ids = classifier_logits(
                        clf, tokens, n_tokens, batch, packed, validate=False
                    )
                loss = loss_fn(batch, logits.float(), ids)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                losses.append(float(loss.detach()))
                bar.update()
            history["train"].append({"epoch": epoch, "step": step, "loss": float(np.mean(losses))})
            message = f"{desc} epoch {epoch}: loss {history['train'][-1]['loss']:.4f}"
            if evaluate is not None:
                val_loss, score = evaluate()
                history["eval"].append(
                    {"epoch": epoch, "step": step, "loss": val_loss, "macro_f1": score}
                )
                message += f", validation loss {val_loss:.4f}, macro-F1 {score:.4f}"
                if score > best_score:
                    best_score, stale = score, 0
                    best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
                else:
                    stale += 1
            logger.info(message)
            if patience is not None and stale >= patience:
                logger.info(f"{desc}: no validation gain in {patience} epochs; stopping early.")
                break
    if best_state is not None:
        clf.load_state_dict(best_state)
    return history
