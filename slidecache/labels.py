"""How a run names its stores and a sweep its rows."""

from __future__ import annotations


def distinct_labels(names: list[str]) -> list[str]:
    """Names as labels: a name given again is numbered from its second time (virchow2, virchow2#2, ...)."""
    return [n if not names[:i].count(n) else f"{n}#{names[:i].count(n) + 1}" for i, n in enumerate(names)]
