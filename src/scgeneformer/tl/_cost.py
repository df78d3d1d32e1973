"""What a screen will cost on the CPU, estimated before it runs, from a measured rate.

A variant of L tokens run through n layers of width h (feed-forward width f) costs about
``2 L n (4 h^2 + 2 h f)`` multiply-adds in the dense layers plus ``4 L^2 n h`` in attention.
The rate is the one measured by ``bench/bench_in_silico.py`` on the project's 2-core CPU
(V1-10M, 128 tokens, fp32: 239 variants/s, reading layer 5 of 6), about 1.8e11 FLOP/s. Other
CPUs differ, so the warning says what the estimate rests on.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..model import Geneformer

MEASURED_CPU_FLOPS = 1.8e11
WARN_SECONDS = 300.0


def variant_flops(model: Geneformer, length: np.ndarray | int, n_layers: int) -> np.ndarray:
    """Floating-point operations of one forward pass of ``length`` tokens through ``n_layers``.

    Examples
    --------
    >>> float(variant_flops(model, 127, 5)) / MEASURED_CPU_FLOPS  # doctest: +SKIP
    0.0044
    """
    c = model.config
    length = np.asarray(length, dtype=np.float64)
    dense = 2 * length * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)
    attention = 4 * length**2 * c.hidden_size
    return n_layers * (dense + attention)


def warn_if_slow_on_cpu(
    model: Geneformer,
    lengths: np.ndarray,
    variants: np.ndarray,
    n_layers: int,
    *,
    device_type: str,
    mode: str,
) -> float:
    """Estimate a screen's CPU seconds; warn with the estimate when it exceeds five minutes.

    ``lengths`` and ``variants`` are per start cell: its tokens and the variants made of it.
    Returns the estimate (0 on other devices, which are not measured yet).
    """
    if device_type != "cpu":
        return 0.0
    seconds = float((variants * variant_flops(model, lengths, n_layers)).sum())
    seconds /= MEASURED_CPU_FLOPS
    if seconds > WARN_SECONDS:
        warnings.warn(
            f"This in silico {mode} screen runs {int(variants.sum()):,} variants of up to "
            f"{int(lengths.max())} tokens on the CPU: about {seconds / 60:,.0f} minutes at the "
            "rate measured on a 2-core CPU (your CPU may differ). Screen fewer cells "
            "(max_cells=), list the genes of interest (genes=[...]), or run on a GPU.",
            UserWarning,
            stacklevel=4,
        )
    return seconds
