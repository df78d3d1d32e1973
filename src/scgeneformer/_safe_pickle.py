"""Loading the official Geneformer dictionaries without executing arbitrary pickled code."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The official dictionaries hold numpy scalars (V1 token ids, all medians). Rebuilding one needs
# exactly these two callables; nothing else may be named by the pickle.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}

_MAX_PICKLE_BYTES = 512 * 1024 * 1024


class UnsafePickleError(ValueError):
    """A pickle names something other than plain dicts of strings and numbers."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source} asks to load '{module}.{name}'; only dicts of strings and numbers "
            "are accepted from a pickle. Use the official Geneformer dictionary files, or save "
            "your own vocabulary with Vocabulary.save (JSON)."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source} uses persistent ids, which are not accepted.")


def _is_plain_value(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, str | int | float | np.integer | np.floating)


def load_plain_dict(path: str | os.PathLike, *, what: str = "dictionary") -> dict[str, Any]:
    """Load a pickled dict whose keys are strings and whose values are strings or numbers.

    Parameters
    ----------
    path
        Path to the pickle file.
    what
        What the file is meant to hold, for error messages.

    Returns
    -------
    The dict, with numpy scalars turned into Python ints and floats.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    UnsafePickleError
        The pickle names a callable other than the numpy scalar constructors, or holds anything
        but a dict of strings and numbers.
    ValueError
        The file is not a readable pickle.

    Examples
    --------
    >>> tokens = load_plain_dict("token_dictionary_gc104M.pkl", what="token dictionary")
    ... # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} file {str(path)!r} does not exist.")
    if path.stat().st_size > _MAX_PICKLE_BYTES:
        raise ValueError(f"The {what} file {str(path)!r} is larger than any Geneformer dictionary.")
    source = f"The {what} file {str(path)!r}"
    with path.open("rb") as fh:
        try:
            obj = _RestrictedUnpickler(fh, source).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # pickle raises many types on corrupt input
            raise ValueError(
                f"{source} could not be read as a pickle ({type(err).__name__}: {err}). "
                "Is it the right file, and complete?"
            ) from err
    if not isinstance(obj, Mapping):
        raise UnsafePickleError(f"{source} holds a {type(obj).__name__}, not a dict.")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not _is_plain_value(value):
            raise UnsafePickleError(
                f"{source} holds an entry {key!r}: {type(value).__name__}; only string keys with "
                "string or number values are accepted."
            )
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out
