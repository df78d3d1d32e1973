"""A learning-rate range test (Smith 2017): choose the peak learning rate from the data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._optim import trainable_state

logger = logging.getLogger(__name__)

LOW, HIGH = 1e-6, 1e-1
N_STEPS = 64
_SMOOTHING = 0.9
# Stop once the smoothed loss is this many times its lowest: the rate has diverged.
_DIVERGED = 4.0
# The chosen rate is the one of the lowest smoothed loss divided by this (fastai's rule: the
# lowest point is already at the edge of instability).
_BACK_OFF = 10.0
# A curve whose lowest point (after its first eighth, whose debiased values are single
# batches' losses) is not this share below where it started found no descent: a model on a
# plateau (a small classifier from random weights at chance, whose loss does not move within
# the test's steps). Its minimum is noise, often at the lowest rate. The edge of instability
# is then where the loss first rises this share above the plateau, and the rate chosen is
# that one divided by _BACK_OFF. Measured on 600 synthetic cells (6 donors, two states,
# bench/bench_finetune.py's search part): the minimum rule chose 1e-6 and the classifier
# stayed at chance (held-out macro-F1 0.33); the plateau rule reached 0.90. With a 1% share
# and the first eighth searched too, two of five cross-validation splits of tutorial 5's
# cells still got 1e-6: their first batch's loss was 1.3% under the plateau by chance.
_NO_DESCENT = 0.02


def lr_range_test(
    model: nn.Module,
    batches: Sequence[Any],
    step: Callable[[torch.optim.Optimizer, Any], float],
    make_optimizer: Callable[[float], torch.optim.Optimizer],
    *,
    low: float = LOW,
    high: float = HIGH,
    n_steps: int = N_STEPS,
) -> tuple[float, dict[str, list[float]]]:
    """Raise the learning rate geometrically over training steps and return a good peak rate.

    ``n_steps`` steps of ``step(optimizer, batch)`` (which returns the batch's loss after one
    update) run with rates from ``low`` to ``high``, cycling through ``batches``; the test stops
    early once the smoothed loss exceeds four times its minimum or is not finite. The chosen
    rate is the one at the lowest smoothed loss divided by ten, or on a plateau the one where
    the loss starts to rise divided by ten (:func:`chosen_rate`). The model's weights are
    restored afterwards (the optimizer is thrown away).

    Parameters
    ----------
    model
        The model being trained; its state is saved and restored.
    batches
        Training batches, as ``step`` takes them.
    step
        One optimizer step on a batch; returns the loss.
    make_optimizer
        Builds a fresh optimizer with a given learning rate.
    low, high
        The range of rates.
    n_steps
        Steps of the test.

    Returns
    -------
    ``(lr, curve)`` with ``curve = {"lr": [...], "loss": [...]}`` (the smoothed loss).

    Examples
    --------
    >>> net = nn.Linear(4, 2)
    >>> x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(64)
    >>> def step(opt, batch):
    ...     loss = nn.functional.cross_entropy(net(x[batch]), y[batch].long())
    ...     opt.zero_grad(); loss.backward(); opt.step()
    ...     return float(loss.detach())
    >>> lr, curve = lr_range_test(net, [slice(0, 32), slice(32, 64)], step,
    ...                           lambda lr: torch.optim.SGD(net.parameters(), lr=lr))
    >>> 1e-6 < lr < 1e-1
    True
    """
    saved = trainable_state(model)  # frozen weights stay as they are
    rates = np.geomspace(low, high, n_steps)
    optimizer = make_optimizer(float(rates[0]))
    curve: dict[str, list[float]] = {"lr": [], "loss": []}
    smoothed, best = 0.0, np.inf
    for index, rate in enumerate(rates):
        for group in optimizer.param_groups:
            group["lr"] = float(rate)
        loss = step(optimizer, batches[index % len(batches)])
        if not np.isfinite(loss):
            break
        smoothed = _SMOOTHING * smoothed + (1 - _SMOOTHING) * loss
        debiased = smoothed / (1 - _SMOOTHING ** (index + 1))
        curve["lr"].append(float(rate))
        curve["loss"].append(float(debiased))
        best = min(best, debiased)
        if debiased > _DIVERGED * best:
            break
    model.load_state_dict(saved, strict=False)
    if not curve["loss"]:
        return float(low), curve
    return max(chosen_rate(curve["lr"], curve["loss"]), float(low)), curve


def chosen_rate(rates: Sequence[float], losses: Sequence[float]) -> float:
    """Return the peak learning rate a range test's smoothed loss curve points to.

    The rate at the lowest loss divided by ten, where the loss did fall; on a plateau (the
    lowest point after the first eighth of the curve less than 2% under the median of that
    eighth), the rate at which the loss first rose 2% above it, divided by ten (the largest
    rate tried, divided by ten, if it never rose).

    Examples
    --------
    >>> chosen_rate([1e-4, 1e-3, 1e-2, 1e-1], [1.0, 0.6, 0.4, 3.0])
    0.001
    >>> chosen_rate([1e-4, 1e-3, 1e-2, 1e-1], [0.693, 0.692, 0.694, 0.9])
    0.01
    """
    rates, losses = np.asarray(rates, dtype=float), np.asarray(losses, dtype=float)
    window = max(1, len(losses) // 8)
    start = float(np.median(losses[:window]))
    lowest = int(np.argmin(losses[window:])) + window if len(losses) > window else 0
    if losses[lowest] < (1 - _NO_DESCENT) * start:
        return float(rates[lowest] / _BACK_OFF)
    risen = np.flatnonzero(losses > (1 + _NO_DESCENT) * start)
    edge = rates[risen[0]] if len(risen) else rates[-1]
    return float(edge / _BACK_OFF)
