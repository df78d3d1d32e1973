"""Example data sets."""

__all__: list[str] = []
