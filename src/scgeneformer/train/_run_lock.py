"""One writer per run folder: an exclusive lock held for a pretraining run's whole life.

Two runs started into one ``output_dir`` would otherwise both train and silently replace each
other's checkpoints and model. The lock is ``fcntl.flock`` on ``output_dir/.scgeneformer.lock``;
the file also names its holder (host, pid, start time), so the second run is told who holds the
folder. The kernel drops a flock when its process dies, however it dies, so a run killed with
SIGKILL never leaves the folder locked; a clean end also empties the file, so a file that still
names a holder when the lock is free was left by a run that died, which is said with a warning.
That holds for a holder on another host too where flock spans hosts (NFSv4, Lustre mounted
with flock, GPFS): a preempted job resumed on another node takes the folder over.

On file systems without ``flock`` (some network mounts) the holder named in the file decides:
a dead process on this host is taken over, anything else is refused (a process on another
host cannot be checked from here), with the file to delete when that run has ended.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = ".scgeneformer.lock"


class RunFolderInUse(RuntimeError):
    """Another run holds the output folder."""


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _read_holder(fd: int) -> dict[str, Any] | None:
    """Read the holder the lock file names; None when the file is empty."""
    text = os.pread(fd, 4096, 0)
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {
            "host": "?",
            "pid": "?",
            "started": "?",
            "unreadable": text[:80].decode(errors="replace"),
        }
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a process that has not written its name yet"
    return (
        f"host {holder.get('host')!s}, pid {holder.get('pid')!s}, started {holder.get('started')!s}"
    )


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` is a live process on this host (False when it cannot be on this host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass
class RunLock:
    """A held run-folder lock; :meth:`release` it when the run ends."""

    path: Path
    fd: int | None

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock; safe to call twice."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_run_folder(folder: str | os.PathLike) -> RunLock:
    """Take the exclusive lock of a run folder, or raise :class:`RunFolderInUse` naming its holder.

    Parameters
    ----------
    folder
        An existing, writable run folder.

    Returns
    -------
    The held lock.

    Examples
    --------
    >>> import tempfile
    >>> lock = lock_run_folder(tempfile.mkdtemp())
    >>> lock_run_folder(lock.path.parent)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    RunFolderInUse: output_dir is in use by another run
    >>> lock.release()
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise PermissionError(
            f"Cannot open the run folder's lock file {str(path)!r} for writing "
            f"({type(err).__name__}: {err}); another user's run may own it. Choose an output_dir "
            "of your own. Nothing was trained."
        ) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel_lock = True
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            raise RunFolderInUse(
                f"output_dir {str(folder)!r} is in use by another run ({holder}). "
                "Two runs in one folder would overwrite each other's checkpoints and model: "
                "wait for it to finish, stop it, or choose another output_dir."
            ) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            kernel_lock = False  # no flock here: only the holder named in the file can tell
        previous = _read_holder(fd)
        mine = previous is not None and (previous.get("host"), previous.get("pid")) == (
            socket.gethostname(),
            os.getpid(),
        )
        if previous is not None and not mine:
            if not kernel_lock and (
                _alive_here(previous) or previous.get("host") != socket.gethostname()
            ):
                raise RunFolderInUse(
                    f"output_dir {str(folder)!r} is in use by another run ({_describe(previous)}); "
                    "this file system has no flock, so whether it still runs cannot be checked "
                    f"from here. Wait for it, or if it has ended, delete {str(path)!r}."
                )
            warnings.warn(
                f"output_dir {str(folder)!r} was locked by a run that ended without releasing "
                f"it ({_describe(previous)}); taking the lock over.",
                UserWarning,
                stacklevel=2,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd)


__all__ = ["LOCK_NAME", "RunFolderInUse", "RunLock", "lock_run_folder"]
