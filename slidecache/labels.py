"""How a run names its stores and a sweep its rows."""

from __future__ import annotations


def distinct_labels(names: list[str]) -> list[str]:
    """Names as labels of a run's stores or a sweep's rows: a name given more than once is numbered
    (virchow2, virchow2#2, ...)."""
    return [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]
