"""Package-wide settings: device, dtype, batch token budget, workers, progress, logging."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

_VERBOSITY = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO}
_VERBOSITY.update({"debug": logging.DEBUG, "hint": logging.DEBUG})
_LEVEL_OF_INT = [logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Settings:
    """Defaults that calls use when they are not given explicitly.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA when present, else CPU) or any torch device string.
    dtype
        ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"`` or
        ``"float16"``.
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
        """Turn ``dtype`` (or the setting) into a :class:`torch.dtype` for ``device``."""
        choice = self.dtype if dtype is None else dtype
        if isinstance(choice, torch.dtype):
            return choice
        if choice == "auto":
            on_cuda = (device or self.resolve_device()).type == "cuda"
            return torch.bfloat16 if on_cuda else torch.float32
        if choice not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {choice!r}.")
        return _DTYPES[choice]


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
