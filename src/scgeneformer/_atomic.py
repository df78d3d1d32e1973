"""Writing files and folders so that a reader sees the old version or the new, never half.

Everything the package writes for later (vocabularies, model folders, checkpoints, token
stores, histories) goes through here: written beside the target under a hidden name, flushed
to disk, then renamed into place.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """Read the process's umask without changing it (``os.umask`` would, for all threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file the permissions of any file the user creates (0666 less the umask).

    For files whose writer picks private permissions itself (safetensors writes 0600), so a
    saved model stays readable by the colleagues the umask lets read it.
    """
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Give a temporary path beside ``path``; when the block ends, it replaces ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
    >>> with atomic_file(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (gzip-compressed when ``path`` ends in ``.gz``) atomically."""
    compress = Path(path).suffix == ".gz"
    with atomic_file(path) as tmp:
        if compress:
            with gzip.open(tmp, "wt", encoding="utf-8") as fh:
                fh.write(text)
        else:
            tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


@contextlib.contextmanager
def staging_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Give a new hidden folder beside ``folder`` to write into; it is removed at the end.

    It gets the permissions of any folder the user creates (the umask), not ``mkdtemp``'s
    private 0700, so that what is renamed out of it stays readable by colleagues.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder``, then the folder itself."""
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(folder)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Give a staging folder; when the block ends, it is flushed and becomes ``folder``.

    An existing ``folder`` is moved aside, then removed. If the block raises, ``folder`` is
    left as it was.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "store"
    >>> with atomic_folder(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("1")
    >>> sorted(p.name for p in target.iterdir())
    ['a.txt']
    """
    folder = Path(folder)
    with staging_folder(folder) as tmp:
        yield tmp
        fsync_tree(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        fsync_path(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
