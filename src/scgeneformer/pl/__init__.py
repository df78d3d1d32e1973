"""Plots."""

__all__: list[str] = []
