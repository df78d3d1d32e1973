"""How the command line reports a failure: one line for a user's mistake, a traceback for a bug.

A missing file, a folder that is no model, an unknown state or negative counts are ordinary
mistakes: the package's message says what is wrong and what to do, and a 20-line traceback
only buries it. ``--debug`` shows the traceback anyway.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

USAGE_ERROR = 2  # what argparse exits with for a bad command line

_PACKAGE = Path(__file__).resolve().parent


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of the error is in this package (its own message)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def is_user_error(err: BaseException) -> bool:
    """Tell whether an error is meant for the user: a file problem, or one this package raised.

    A ``ValueError`` deep inside numpy or torch is a bug here, not the user's mistake, and keeps
    its traceback.
    """
    if isinstance(err, OSError):  # missing file, a folder given for a file, no permission
        return True
    ours = ValueError | KeyError | TypeError | RuntimeError  # e.g. a run folder in use
    return isinstance(err, ours) and _raised_here(err)


def _message(err: BaseException) -> str:
    # KeyError's str() quotes its message; the argument is the text.
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(str(text).split()) or type(err).__name__


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the ``--debug`` flag that :func:`run_reporting_errors` reads."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")


def run_reporting_errors(args: argparse.Namespace) -> int:
    """Run the chosen command; a user error prints ``error: ...`` to stderr and returns 2.

    Examples
    --------
    >>> args = argparse.Namespace(debug=False, run=lambda a: 0)
    >>> run_reporting_errors(args)
    0
    """
    try:
        return int(args.run(args))
    except Exception as err:  # reported in one line when it is the user's, re-raised otherwise
        if getattr(args, "debug", False) or not is_user_error(err):
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return USAGE_ERROR
