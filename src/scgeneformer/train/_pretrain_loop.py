"""The masked-gene pretraining loop: one run's state, steps, evaluation and checkpoints.

:func:`scgeneformer.tl.pretrain` checks the arguments, turns an AnnData into its tokens and
hands them (or corpus paths) to a :class:`PretrainRun`, which it drives in order: ``open``,
``plan``, ``restore`` (on resume), ``train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .._atomic import write_json_atomic
from .._plan import attention_backend, execution_plan
from .._progress import progress_bar
from ..data._batching import pack_tokens
from ..data._masking import GeneMasker, batch_generator
from ..data._sources import (
    PaddedTokens,
    TokenSource,
    epoch_batches,
    gene_counts,
    open_corpus,
    rank_batches,
)
from ..model import Geneformer
from ._checkpoints import (
    capture_rng,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
)
from ._distributed import Distributed
from ._history import LossInterval
from ._optim import adamw, autocast, linear_warmup_decay, loss_scaler, seed_everything
from ._run_folder import HISTORY_NAME, check_fingerprint, prepare_output_dir
from ._run_lock import RunLock

logger = logging.getLogger(__name__)

TOKEN_STORE_DIR = "token_store"
MAX_EVAL_CELLS = 10_000
# Tags that keep the random streams derived from one random_state apart.
_SPLIT_TAG, _MASK_TAG, _EVAL_TAG = 0x5A1, 0x3A5, 0xE7A


@dataclass
class _Micro:
    """One batch on the device: model inputs, labels, and counts for normalising and logging."""

    inputs: dict[str, Any]
    labels: torch.Tensor
    n_masked: int
    n_tokens: int


def _prepare(
    source: TokenSource,
    cells: np.ndarray,
    masker: GeneMasker,
    generator: torch.Generator,
    device: torch.device,
    packed: bool,
) -> _Micro:
    lengths = source.lengths[cells]
    batch = masker(source.padded(cells), generator)
    if packed:
        ids, cu_seqlens, longest = pack_tokens(batch.input_ids, lengths)
        positions = pack_tokens(batch.positions, lengths)[0].bool()
        inputs = {
            "input_ids": ids.to(device, non_blocking=True),
            "mlm_positions": positions.to(device, non_blocking=True),
            "cu_seqlens": cu_seqlens.to(device, non_blocking=True),
            "max_seqlen": longest,
        }
    else:
        inputs = {
            "input_ids": batch.input_ids.to(device),
            "mlm_positions": batch.positions.to(device),
        }
    return _Micro(inputs, batch.labels.to(device), batch.n_masked, int(lengths.sum()))


def _split_cells(
    source: TokenSource, has_cls: bool, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cells to train on and cells held out, among those with at least two gene tokens."""
    usable = np.flatnonzero(gene_counts(source.lengths, has_cls) >= 2)
    if len(usable) == 0:
        raise ValueError(
            f"No cell of {source.description} has two or more gene tokens, so there is nothing "
            "to learn from (a masked gene needs others to be predicted from). Check that the "
            "cells were tokenized with the right vocabulary and gene_key."
        )
    skipped = len(source) - len(usable)
    if skipped:
        warnings.warn(
            f"{skipped:,} of {len(source):,} cells have fewer than two gene tokens and are "
            "skipped.",
            UserWarning,
            stacklevel=4,
        )
    shuffled = np.random.default_rng([seed, _SPLIT_TAG]).permutation(usable)
    n_eval = min(round(eval_fraction * len(usable)), MAX_EVAL_CELLS)
    if eval_fraction > 0 and len(usable) > 1:
        n_eval = max(n_eval, 1)
    eval_cells, train_cells = np.sort(shuffled[:n_eval]), np.sort(shuffled[n_eval:])
    return train_cells, eval_cells


@dataclass(frozen=True)
class PretrainArguments:
    """The settings of a run, resolved (defaults filled in) and checked."""

    output_dir: Path
    dtype: torch.dtype
    lr: float
    weight_decay: float
    warmup_steps: int
    token_budget: int
    accumulation: int
    clip_norm: float | None
    save_every: int
    keep_last: int
    eval_fraction: float
    log_every: int
    seed: int
    progress: bool
    layer: str | None = None
    gene_key: str | None = None


def _evaluate(
    model: Geneformer,
    source: TokenSource,
    batches: list[np.ndarray],
    masker: GeneMasker,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    packed: bool,
    ctx: Distributed,
) -> dict[str, float]:
    """Held-out masked-gene loss and top-1 accuracy, with the same masks every time."""
    was_training = model.training
    model.eval()
    ce = correct = n = 0.0
    counts = torch.zeros(len(model.vocab), dtype=torch.float64)
    with torch.no_grad():
        for i in range(ctx.rank, len(batches), ctx.world_size):
            micro = _prepare(
                source, batches[i], masker, batch_generator(seed, _EVAL_TAG, i), device, packed
            )
            with autocast(device, dtype):
                logits = model(**micro.inputs, validate=False)
            logits = logits.float()
            ce += float(F.cross_entropy(logits, micro.labels, reduction="sum"))
            correct += float((logits.argmax(dim=-1) == micro.labels).sum())
            n += micro.n_masked
            counts += torch.bincount(micro.labels.cpu(), minlength=len(model.vocab))
    model.train(was_training)
    totals = ctx.all_reduce_sum(torch.cat([torch.tensor([ce, correct, n]), counts]))
    n_total = max(float(totals[2]), 1.0)
    return {
        "loss": float(totals[0]) / n_total,
        "accuracy": float(totals[1]) / n_total,
        # Always guessing the most frequent held-out masked gene: what accuracy must beat.
        "frequency_baseline": float(totals[3:].max()) / n_total,
        "n_masked": int(totals[2]),
    }


class PretrainRun:
    """The state of one pretraining run, split into steps that :func:`pretrain` calls in order."""

    def __init__(
        self, model: Geneformer, ctx: Distributed, masker: GeneMasker, args: PretrainArguments
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.masker = masker
        self.args = args
        self.device = ctx.device
        self.execution = execution_plan(
            self.device,
            args.dtype,
            training=True,
            attention_dropout=model.config.attention_probs_dropout_prob,
        )
        self.packed = self.execution.packed
        self.scaler = loss_scaler(self.execution)
        self.history: dict[str, Any] = {"train": [], "eval": []}
        self.step = 0
        self.lock: RunLock | None = None

    # ------------------------------------------------------------------ setup
    def open(self, data: PaddedTokens | Any, resume: bool) -> None:
        """Check the output folder, then open the corpus (tokens or paths) and split it."""
        self.lock = self.ctx.on_main(
            lambda: prepare_output_dir(self.args.output_dir, resume), "checking output_dir"
        )
        self.source = open_corpus(
            data,
            self.model,
            store_folder=self.args.output_dir / TOKEN_STORE_DIR,
            ctx=self.ctx,
            require_existing_store=resume and bool(list_checkpoints(self.args.output_dir)),
            layer=self.args.layer,
            gene_key=self.args.gene_key,
        )
        # Once, on the CPU, before any step: ids outside the vocabulary would fail inside the
        # embedding lookup (a device-side assert on CUDA), and the hash tells a resumed run
        # whether these are the tokens it started with.
        digest = self.ctx.on_main(lambda: self.source.scan(self.model.vocab), "checking the tokens")
        self.tokens_digest = self.ctx.gather(digest)[0]
        self.train_cells, self.eval_cells = _split_cells(
            self.source, self.model.vocab.has_cls, self.args.eval_fraction, self.args.seed
        )
        self.eval_batches = epoch_batches(
            self.eval_cells,
            self.source.lengths,
            0,
            token_budget=self.args.token_budget,
            padded=not self.packed,
            seed=self.args.seed + _EVAL_TAG,
        )

    def plan(self, max_steps: int | None, epochs: int) -> None:
        """Count the steps (per epoch, in all); build the optimizer and schedule."""
        self.per_step = self.ctx.world_size * self.args.accumulation
        n_batches = len(self._epoch_batches(0))
        self.steps_per_epoch = n_batches // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"The {len(self.train_cells):,} training cells make {n_batches} batches of "
                f"{self.args.token_budget:,} tokens, fewer than the {self.per_step} one step needs "
                f"({self.ctx.world_size} processes x {self.args.accumulation} accumulated); lower "
                "token_budget or gradient_accumulation_steps."
            )
        self.total_steps = int(max_steps) if max_steps else int(epochs) * self.steps_per_epoch
        if self.args.warmup_steps >= self.total_steps:
            warnings.warn(
                f"warmup_steps={self.args.warmup_steps:,} is not below the {self.total_steps:,} "
                "training steps: the learning rate never reaches lr. Lower warmup_steps for "
                "short runs.",
                UserWarning,
                stacklevel=3,
            )
        self.model.to(self.device).float().train()
        self.optimizer = adamw(self.model, self.args.lr, self.args.weight_decay)
        self.scheduler = linear_warmup_decay(
            self.optimizer, self.args.warmup_steps, self.total_steps
        )
        self.fingerprint = {
            "random_state": self.args.seed,
            "token_budget": self.args.token_budget,
            "batches_per_step": self.per_step,
            "packed": self.packed,
            "mask_fraction": self.masker.mask_fraction,
            "eval_fraction": self.args.eval_fraction,
            "n_cells": len(self.source),
            "n_tokens": int(self.source.lengths.sum()),
            "lr": self.args.lr,
            "weight_decay": self.args.weight_decay,
            "warmup_steps": self.args.warmup_steps,
            "tokens_blake2b": self.tokens_digest,
            "vocabulary_sha256": self.model.vocab.sha256,
            "model_config": dataclasses.asdict(self.model.config),
        }
        logger.info(
            "Pretraining on %d cells (%d held out) from %s: %d steps, %d per epoch",
            len(self.train_cells),
            len(self.eval_cells),
            self.source.description,
            self.total_steps,
            self.steps_per_epoch,
        )

    def restore(self) -> bool:
        """Load the newest complete checkpoint into model, optimizer and schedule, if any."""
        checkpoint = load_latest_checkpoint(self.args.output_dir)
        if checkpoint is None:
            warnings.warn(
                f"resume=True, but {str(self.args.output_dir)!r} holds no checkpoint; starting "
                "from step 0.",
                UserWarning,
                stacklevel=3,
            )
            return False
        check_fingerprint(
            checkpoint.info.get("fingerprint", {}), self.fingerprint, checkpoint.folder
        )
        self.model.load_state_dict(checkpoint.weights)
        self.optimizer.load_state_dict(checkpoint.trainer_state["optimizer"])
        self.scheduler.load_state_dict(checkpoint.trainer_state["scheduler"])
        if checkpoint.trainer_state.get("scaler"):  # empty when saved without float16
            self.scaler.load_state_dict(checkpoint.trainer_state["scaler"])
        # The learning rate of the next step under this run's schedule, which differs from the
        # saved one when max_steps or epochs changed.
        for group, base_lr, factor in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        states = checkpoint.trainer_state["rng"]
        if len(states) == self.ctx.world_size:
            restore_rng(states[self.ctx.rank])
        else:
            # Another process count: the global batches stay the same, dropout draws cannot.
            seed_everything(self.args.seed + self.ctx.rank + checkpoint.step)
        self.history = checkpoint.info["history"]
        self.step = checkpoint.step
        logger.info("Resumed from %s at step %d", checkpoint.folder, self.step)
        return True

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        return epoch_batches(
            self.train_cells,
            self.source.lengths,
            epoch,
            token_budget=self.args.token_budget,
            padded=not self.packed,
            seed=self.args.seed,
        )

    # ------------------------------------------------------------------ training
    def train(self) -> Geneformer:
        """Run the remaining steps, checkpointing on the way; save the final model."""
        with attention_backend(self.execution):  # around the backward passes too
            return self._train()

    def _train(self) -> Geneformer:
        net: torch.nn.Module = self.model
        if self.ctx.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=device_ids)
        interval = LossInterval()
        batches, batches_epoch = None, -1
        bar = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc="pretrain",
            unit="step",
            enabled=self.args.progress and self.ctx.is_main,
        )
        with bar:
            while self.step < self.total_steps:
                epoch, within = divmod(self.step, self.steps_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = self._epoch_batches(epoch), epoch
                lr = self.optimizer.param_groups[0]["lr"]
                self._step(net, batches, epoch, within, interval)
                self.step += 1
                bar.update(1)
                if self.step % self.args.log_every == 0 or self.step == self.total_steps:
                    loss, tokens_per_s = interval.flush(self.ctx)
                    self.history["train"].append(
                        {
                            "step": self.step,
                            "epoch": self.step / self.steps_per_epoch,
                            "loss": loss,
                            "lr": lr,
                            "tokens_per_s": tokens_per_s,
                        }
                    )
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                if self.step % self.args.save_every == 0 or self.step == self.total_steps:
                    self._checkpoint()
                    interval.start = time.perf_counter()  # throughput without checkpoint time
        self.model.training_args = self._training_args()
        self.ctx.on_main(self._save_final, "saving the final model")
        return self.model.eval()

    def _step(
        self,
        net: torch.nn.Module,
        batches: list[np.ndarray],
        epoch: int,
        within: int,
        interval: LossInterval,
    ) -> None:
        """One optimisation step over this process's share of the step's batches."""
        indices = rank_batches(within, self.ctx.world_size, self.args.accumulation, self.ctx.rank)
        micros = [
            _prepare(
                self.source,
                batches[i],
                self.masker,
                batch_generator(self.args.seed, _MASK_TAG, epoch, i),
                self.device,
                self.packed,
            )
            for i in indices
        ]
        # Every masked gene of the global batch weighs the same, whichever process has it;
        # DDP averages gradients over processes, hence the factor world_size.
        n_masked = float(self.ctx.all_reduce_sum([sum(m.n_masked for m in micros)])[0])
        scale = self.ctx.world_size / n_masked
        for a, micro in enumerate(micros):
            last = a == len(micros) - 1
            sync = (
                net.no_sync()
                if isinstance(net, DistributedDataParallel) and not last
                else contextlib.nullcontext()
            )
            with sync:
                with autocast(self.device, self.args.dtype):
                    logits = net(**micro.inputs, validate=False)
                ce = F.cross_entropy(logits.float(), micro.labels, reduction="sum")
                self.scaler.scale(ce * scale).backward()
            interval.add(ce, micro.n_masked, micro.n_tokens)
        if self.args.clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ outputs
    def _evaluate(self) -> None:
        if not len(self.eval_batches):
            return
        result = _evaluate(
            self.model,
            self.source,
            self.eval_batches,
            self.masker,
            self.args.seed,
            self.device,
            self.args.dtype,
            self.packed,
            self.ctx,
        )
        self.history["eval"].append({"step": self.step, **result})
        logger.info(
            "step %d: held-out masked-gene accuracy %.4f (most frequent gene: %.4f)",
            self.step,
            result["accuracy"],
            result["frequency_baseline"],
        )

    def _checkpoint(self) -> None:
        self._evaluate()
        rng_states = self.ctx.gather(capture_rng())
        self.model.training_args = self._training_args()
        epoch, within = divmod(self.step, self.steps_per_epoch)
        info = {
            "epoch": epoch,
            "next_batch": within * self.per_step,
            "total_steps": self.total_steps,
            "world_size": self.ctx.world_size,
            "fingerprint": self.fingerprint,
            "history": self.history,
        }
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
        }

        def write() -> None:
            save_checkpoint(
                self.args.output_dir,
                self.step,
                self.model,
                trainer_state,
                info,
                self.args.keep_last,
            )
            write_json_atomic(self.args.output_dir / HISTORY_NAME, self.history)

        self.ctx.on_main(write, f"writing the checkpoint of step {self.step}")

    def close(self) -> None:
        """Release the run folder's lock (rank 0); the run's other resources need nothing."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _save_final(self) -> None:
        self.model.save(self.args.output_dir)
        write_json_atomic(self.args.output_dir / HISTORY_NAME, self.history)

    def _training_args(self) -> dict[str, Any]:
        return {
            "task": "masked-gene pretraining",
            "data": self.source.description,
            "n_train_cells": len(self.train_cells),
            "n_eval_cells": len(self.eval_cells),
            "steps": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.ctx.world_size,
            "gradient_accumulation_steps": self.args.accumulation,
            "clip_norm": self.args.clip_norm,
            "dtype": str(self.args.dtype).removeprefix("torch."),
            "execution_plan": self.execution.as_dict(),
            **self.fingerprint,
            "history": self.history,
        }
