"""Package-wide settings: device, precision, attention path, compilation, batches, logging."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

_VERBOSITY = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}
_VERBOSITY.update({"debug": logging.DEBUG, "hint": logging.DEBUG})
_LEVEL_OF_INT = [logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]


@dataclass
class Settings:
    """Defaults that calls use when they are not given explicitly.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA when present, else CPU) or any torch device string.
    dtype
        ``"auto"`` (bfloat16 on GPUs of compute capability 8.0+, float16 on 7.x, else
        float32), ``"float32"``, ``"bfloat16"`` or ``"float16"``. A dtype the device lacks
        is replaced, with a note in the plan (see :func:`scgeneformer.show_versions`).
    attention
        ``"auto"`` (the fastest path that runs here), or force ``"varlen"`` (packed, flash
        ``varlen_attn``), ``"nested"`` (packed, nested jagged tensors with SDPA) or
        ``"padded"`` (padded batches with SDPA).
    compile
        Run embedding and in silico screens through ``torch.compile`` (off by default:
        compiling costs seconds to minutes up front, and pays only on large runs).
    attention_backend
        SDPA backend on CUDA: ``"auto"`` (torch's choice), ``"flash"`` (never cuDNN, also
        for torch 2.14's ``varlen_attn``) or ``"cudnn"`` (cuDNN first). Which is faster
        depends on GPU and torch and is not yet measured here; see ``bench/gpu_run.sh``.
    token_budget
        Tokens per batch when cells are packed for the model.
    n_jobs
        Worker threads for tokenization (default: all cores).
    progress
        Whether to show tqdm progress bars.
    verbosity
        What the package logger (``logging.getLogger("scgeneformer")``) prints, as scanpy's
        setting: 0 or ``"error"``, 1 or ``"warning"`` (default), 2 or ``"info"`` (validation
        scores, the baseline beside the model, held-out pretraining accuracy, timings),
        3 or ``"debug"``.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> sgf.settings.token_budget = 32_768
    >>> sgf.settings.verbosity = "info"
    >>> logging.getLogger("scgeneformer").level == logging.INFO
    True
    >>> sgf.settings.verbosity = 1
    >>> sgf.settings.resolve_device().type in {"cpu", "cuda"}
    True
    """

    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "varlen", "nested", "padded"] = "auto"
    compile: bool = False
    attention_backend: Literal["auto", "flash", "cudnn"] = "auto"
    token_budget: int = 65_536
    n_jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True
    verbosity: int | str = 1

    def __setattr__(self, name: str, value: object) -> None:
        if name == "verbosity":
            _apply_verbosity(value)
        super().__setattr__(name, value)

    def resolve_device(self, device: str | torch.device | None = None) -> torch.device:
        """Turn ``device`` (or the setting) into a concrete :class:`torch.device`."""
        choice = self.device if device is None else device
        if isinstance(choice, torch.device):
            return choice
        if choice == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(choice)

    def resolve_dtype(
        self, dtype: str | torch.dtype | None = None, device: torch.device | None = None
    ) -> torch.dtype:
        """Give the compute dtype that runs on ``device`` for ``dtype`` (or the setting).

        The execution plan decides (:func:`scgeneformer._plan.choose_plan`), so a dtype the
        device lacks comes back replaced, with a warning.
        """
        from ._plan import execution_plan, warn_if_dtype_replaced

        plan = execution_plan(device, dtype, log=False)
        warn_if_dtype_replaced(plan)
        return plan.dtype


def _apply_verbosity(value: object) -> None:
    """Set the package logger's level; give it a handler so that info lines show at all."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"verbosity must be 0-3 or a level name, got {value!r}.")
    if isinstance(value, int):
        if not 0 <= value <= 3:
            raise ValueError(f"verbosity must be 0 (error) to 3 (debug), got {value}.")
        level = _LEVEL_OF_INT[value]
    elif value.lower() in _VERBOSITY:
        level = _VERBOSITY[value.lower()]
    else:
        raise ValueError(f"verbosity must be one of {sorted(_VERBOSITY)} or 0-3, got {value!r}.")
    logger = logging.getLogger("scgeneformer")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


settings = Settings()
