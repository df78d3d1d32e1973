"""Progress bars: one place decides whether and how long work shows its progress."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from ._settings import settings


def progress_bar(
    *, total: int | None, desc: str, unit: str, enabled: bool | None = None, **options: Any
) -> tqdm:
    """Make a tqdm bar, shown when ``enabled`` (default ``sgf.settings.progress``).

    Examples
    --------
    >>> with progress_bar(total=3, desc="cells", unit="cells", enabled=False) as bar:
    ...     bar.update(3)
    """
    shown = settings.progress if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit=unit, disable=not shown, **options)
