"""Pieces every training loop here shares: precision, loss scaling, optimiser, schedule, seeding."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .._plan import ExecutionPlan
from .._settings import settings


def resolve_device_dtype(
    device: str | torch.device | None, dtype: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Concrete device and the compute dtype the execution plan runs there.

    Examples
    --------
    >>> resolve_device_dtype("cpu", None)
    (device(type='cpu'), torch.float32)
    """
    resolved = settings.resolve_device(device)
    return resolved, settings.resolve_dtype(dtype, resolved)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision: float32 weights, ``dtype`` matrix products and attention.

    Only for a 16-bit ``dtype`` (the execution plan allows bfloat16 on CPUs and GPUs of
    capability 8.0+, float16 on GPUs); float32 runs as it is.
    """
    if dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield


def loss_scaler(plan: ExecutionPlan) -> torch.amp.GradScaler:
    """Gradient scaling where the plan trains in float16 (a pass-through elsewhere).

    float16's narrow range lets small gradients underflow to zero; the scaler multiplies the
    loss before backward and divides the gradients before the optimizer step, skipping steps
    whose gradients overflowed.
    """
    return torch.amp.GradScaler(plan.device.type, enabled=plan.loss_scaling)


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, LayerNorms, embeddings' norms).

    This is how transformers' Trainer, which Geneformer was trained with, groups parameters.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy the parameters that train, by name, to restore with ``strict=False``.

    Frozen weights never change, so they need no copy: under a LoRA adapter that is all but
    a few MB of the model (and a quantized base could not be restored from a plain copy).

    Examples
    --------
    >>> net = nn.Linear(2, 1)
    >>> _ = net.bias.requires_grad_(False)
    >>> list(trainable_state(net))
    ['weight']
    """
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate rising linearly over ``warmup_steps``, then falling linearly to 0.

    Examples
    --------
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = linear_warmup_decay(opt, warmup_steps=2, total_steps=4)
    >>> [round(sched.lr_lambdas[0](s), 2) for s in range(5)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warmup_steps, total_steps = int(warmup_steps), max(int(total_steps), 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(warmup_steps, 1)
        return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may draw from the global state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
