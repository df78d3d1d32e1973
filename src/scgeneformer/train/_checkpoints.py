"""Training checkpoints: written atomically, the last k kept, the last complete one resumed.

A checkpoint is a folder ``output_dir/checkpoints/step-00001000`` holding the model in its
usual layout (:meth:`~scgeneformer.Geneformer.save`: ``config.json``, ``model.safetensors``,
``vocab.json``, ``scgeneformer.json``) plus ``trainer_state.pt`` (optimizer, scheduler and
random-generator states, read back with ``torch.load(weights_only=True)``) and
``trainer_state.json`` (step, data position, history, the run's data-defining arguments).
It is written into a hidden temporary folder, flushed to disk, and renamed into place, so a
``step-*`` folder is always complete; a crash while writing leaves the previous one as it was.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_folder
from ..model import Geneformer
from ..model._hf_folder import (
    METADATA_NAME,
    STAGING_NAME,
    read_json,
    read_weights,
    verify_weights_file,
)

CHECKPOINTS_DIR = "checkpoints"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
STATE_FORMAT = "scgeneformer-pretrain-checkpoint"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """Return the folder that holds a run's checkpoints."""
    return Path(output_dir) / CHECKPOINTS_DIR


def ensure_writable(folder: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, or raise.

    Examples
    --------
    >>> ensure_writable("runs/v1")  # doctest: +SKIP
    PosixPath('runs/v1')
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"{what} {str(folder)!r} is not a writable folder ({type(err).__name__}: "
            f"{err}); choose another output_dir. Nothing was trained."
        ) from err
    return folder


# ---------------------------------------------------------------------- random states


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) global generator states, torch-loadable safely."""
    numpy_state = np.random.get_state(legacy=False)  # noqa: NPY002 - the global one is saved
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back states saved by :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)  # noqa: NPY002 - the global one is restored
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- writing


def _write_trainer_state(folder: Path, trainer_state: dict[str, Any], info: dict[str, Any]) -> None:
    torch.save(trainer_state, folder / STATE_PT)
    # The JSON last: a reader that sees it sees everything else.
    (folder / STATE_JSON).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: Geneformer,
    trainer_state: dict[str, Any],
    info: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the ``keep_last`` newest.

    Parameters
    ----------
    output_dir
        The run folder; checkpoints go to its ``checkpoints`` subfolder.
    step
        Optimisation steps done.
    model
        The (unwrapped) model; saved with :meth:`~scgeneformer.Geneformer.save`.
    trainer_state
        Tensors and plain containers (optimizer, scheduler, RNG states).
    info
        JSON-serialisable progress: data position, history, arguments.
    keep_last
        Checkpoints to keep.

    Returns
    -------
    The checkpoint folder.
    """
    target = checkpoint_root(output_dir) / f"step-{step:08d}"
    # The same step may be saved again (at the end of a resumed run): it is replaced whole.
    with atomic_folder(target) as tmp:
        model.save(tmp)
        _write_trainer_state(tmp, trainer_state, {"format": STATE_FORMAT, "step": step, **info})
    for _, old_folder in list_checkpoints(output_dir)[: -max(int(keep_last), 1)]:
        shutil.rmtree(old_folder, ignore_errors=True)
    return target


def remove_partial(output_dir: str | os.PathLike) -> None:
    """Delete hidden temporary folders left by a checkpoint or final save that was interrupted.

    Only call it while holding the run folder's lock: another run's writes look the same.
    """
    for path in Path(output_dir).glob(f".{STAGING_NAME}.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            # ".step-N.tmp-*" of save_checkpoint, "..step-N.tmp-*.tmp-*" of the model's save.
            if path.name.startswith(".") and path.name.lstrip(".").startswith("step-"):
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- reading


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete-looking checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: its folder, progress info, trainer state and model weights."""

    folder: Path
    step: int
    info: dict[str, Any]
    trainer_state: dict[str, Any]
    weights: dict[str, torch.Tensor]


def _read_checkpoint(folder: Path, step: int) -> Checkpoint:
    info = read_json(folder / STATE_JSON, "Checkpoint state")
    if info.get("format") != STATE_FORMAT or info.get("step") != step:
        raise ValueError(f"{str(folder / STATE_JSON)!r} is not the state of step {step}.")
    trainer_state = torch.load(folder / STATE_PT, map_location="cpu", weights_only=True)
    verify_weights_file(folder, read_json(folder / METADATA_NAME, "Checkpoint metadata"))
    weights, _ = read_weights(folder)
    return Checkpoint(folder, step, info, trainer_state, weights)


def load_latest_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """Read the newest checkpoint that reads back whole, skipping damaged ones with a warning.

    Examples
    --------
    >>> ckpt = load_latest_checkpoint("runs/v1")  # doctest: +SKIP
    >>> ckpt.step  # doctest: +SKIP
    4000
    """
    for step, folder in reversed(list_checkpoints(output_dir)):
        try:
            return _read_checkpoint(folder, step)
        except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
            warnings.warn(
                f"Checkpoint {str(folder)!r} is damaged or incomplete ({err}); trying the one "
                "before it.",
                UserWarning,
                stacklevel=2,
            )
    return None


__all__ = [
    "Checkpoint",
    "capture_rng",
    "checkpoint_root",
    "ensure_writable",
    "list_checkpoints",
    "load_latest_checkpoint",
    "remove_partial",
    "restore_rng",
    "save_checkpoint",
]
