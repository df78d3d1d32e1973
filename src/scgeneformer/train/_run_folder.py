"""A pretraining run's folder: one writer at a time, checked before work, resumed only as itself.

:func:`prepare_output_dir` takes the folder's lock and checks everything the run will write;
:func:`check_fingerprint` refuses to resume a checkpoint of another run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..model._hf_folder import MODEL_FILES
from ._checkpoints import checkpoint_root, ensure_writable, list_checkpoints, remove_partial
from ._run_lock import RunLock, lock_run_folder

HISTORY_NAME = "history.json"


def prepare_output_dir(output_dir: Path, resume: bool) -> RunLock:
    """Take the run folder's lock and check everything the run will write, before any work.

    Everything a run writes lies inside ``output_dir`` (checkpoints, history, token store, and
    the final model, staged inside it too), so a writable ``output_dir`` and ``checkpoints``
    folder, and no folder where a final file goes, mean no late failure for want of a place to
    write. The lock comes first: clearing partial checkpoints is only safe with no other
    writer.
    """
    ensure_writable(output_dir)
    lock = lock_run_folder(output_dir)
    try:
        ensure_writable(checkpoint_root(output_dir), "The checkpoint folder")
        for name in (*MODEL_FILES, HISTORY_NAME):
            if (output_dir / name).exists() and not (output_dir / name).is_file():
                raise IsADirectoryError(
                    f"{str(output_dir / name)!r} is a folder, but the run's final save writes a "
                    "file there; move it away or choose another output_dir. Nothing was trained."
                )
        remove_partial(output_dir)
        found = list_checkpoints(output_dir)
        if found and not resume:
            raise FileExistsError(
                f"output_dir {str(output_dir)!r} holds checkpoints of an earlier run (last: step "
                f"{found[-1][0]}). Pass resume=True to continue it, or choose another "
                "output_dir; nothing was overwritten."
            )
    except BaseException:
        lock.release()
        raise
    return lock


# Fingerprint entries that checkpoints of older versions lack; those resume with a warning.
_NEWER_FINGERPRINT = ("tokens_blake2b", "vocabulary_sha256", "model_config")
_FINGERPRINT_NAMES = {
    "tokens_blake2b": "the tokens (the same cell and token counts, but other cells, other "
    "tokens or another order)",
    "vocabulary_sha256": "the model's vocabulary",
    "model_config": "the model's architecture",
}


def check_fingerprint(saved: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    """Refuse to resume a checkpoint whose run differs in data, arguments or model."""
    missing = [k for k in _NEWER_FINGERPRINT if k not in saved]
    if missing:
        warnings.warn(
            f"The checkpoint {str(folder)!r} was written by an older scgeneformer and does not "
            f"record {', '.join(missing)}; resuming without checking them.",
            UserWarning,
            stacklevel=4,
        )
    changed = [k for k, v in now.items() if k not in missing and saved.get(k) != v]
    if not changed:
        return
    described = []
    for k in changed:
        if k == "model_config" and isinstance(saved.get(k), dict):
            fields = [
                f"{f}: {saved[k].get(f)!r} then, {v!r} now"
                for f, v in now[k].items()
                if saved[k].get(f) != v
            ]
            described.append(f"{_FINGERPRINT_NAMES[k]} ({', '.join(fields)})")
        elif k in _FINGERPRINT_NAMES:
            described.append(_FINGERPRINT_NAMES[k])
        else:
            described.append(f"{k}: {saved.get(k)!r} then, {now[k]!r} now")
    raise ValueError(
        f"Cannot resume from {str(folder)!r}: the run differs in {'; '.join(described)}. "
        "Resume with the model, arguments and data of the original run, or start a new run in "
        "another output_dir."
    )
