"""Renamed keywords keep working for one release, with a warning that names the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword (``old="new"``) in place of the new one, with a FutureWarning.

    Examples
    --------
    >>> @renamed_keywords(size="n")
    ... def grow(*, n=1):
    ...     return n
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     grow(size=3), str(caught[0].message)
    (3, 'grow(size=...) is renamed grow(n=...); the old name goes in scgeneformer 0.3.')
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{func.__name__}() got both {new}= and its old name {old}=; pass {new}="
                    )
                warnings.warn(
                    f"{func.__name__}({old}=...) is renamed {func.__name__}({new}=...); the old "
                    "name goes in scgeneformer 0.3.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
