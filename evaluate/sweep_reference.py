"""The row of each task that every other row of the task is compared with (`python -m evaluate sweep
--reference`), and each row's paired difference to it.

A reference names a row by some of its parts joined by `/`, in any order: its encoder (the store's label, with
several stores), task, head and pooling (`tiles` for a MIL head, `set:NAME` for a slide-embedding set), e.g.
`coxph`, `coxnet/max`, `uni2-h/OS/abmil-cox`, `grade/logreg/set:titan`. Several may be given: each task takes the
first row, in the sweep's order (a fitted one if any), that the first reference matching a row of the task
matches; a task that none matches, and every task without --reference, takes its first fitted row.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from evaluate.sweep import SweepRow
from evaluate.sweep_intervals import RESAMPLES, paired_difference
from slidecache.errors import ConfigError

HOW = "name a row by any of its encoder, task, head and pooling, joined by /"


def row_name(key: Sequence[str]) -> str:
    """(encoder, task, head, pooling) as the sweep names the row: encoder/task/head/pooling, no empty part."""
    return "/".join(part for part in key if part)


def matches(reference: str, key: Sequence[str]) -> bool:
    parts = [part for part in reference.split("/") if part]
    return bool(parts) and all(part in key for part in parts)


def check_references(references: Sequence[str], plan: Sequence[Sequence[str]]) -> None:
    """Refuse, before anything is fitted, a --reference that matches no row of the sweep, naming its rows."""
    for reference in references:
        if not any(matches(reference, key) for key in plan):
            raise ConfigError(f"--reference {reference} matches no row of the sweep ({HOW}); its rows are: "
                              + ", ".join(row_name(key) for key in plan))


def choose_references(rows: Sequence[SweepRow], references: Sequence[str] = (),
                      log: Callable[[str], None] | None = None) -> dict[str, SweepRow]:
    """Each task's reference row (see the module's docstring); a task that no --reference matches takes its first
    fitted row, and `log` says so (easy to miss otherwise: `coxph/max` names no grade row)."""
    chosen = {}
    for task in dict.fromkeys(r.task for r in rows):
        candidates = [r for r in rows if r.task == task]
        for reference in references:
            matched = [r for r in candidates if matches(reference, (r.encoder, r.task, r.head, r.pooling))]
            if matched:
                candidates = matched
                break
        else:
            if references and log:
                first = next((r for r in candidates if not r.error), candidates[0])
                log(f"note: --reference {' '.join(references)} names no {task} row: {task} rows are compared with "
                    f"the first fitted one, {first.name}")
        chosen[task] = next((r for r in candidates if not r.error), candidates[0])
    return chosen


def attach_differences(rows: Sequence[SweepRow], chosen: dict[str, SweepRow], n: int = RESAMPLES,
                       seed: int = 0) -> float:
    """Mark each task's reference row and give every other fitted row its difference to it, metric by metric
    (evaluate.sweep_intervals.paired_difference); the seconds it took."""
    started = time.perf_counter()
    for row in rows:
        reference = chosen[row.task]
        row.is_reference = row is reference
        if row.is_reference or row.error:
            continue
        if reference.error:
            why = f"the reference row {reference.name} could not be fitted: {reference.error}"
            row.difference = {k: {"difference": None, "ci95": None, "not_computed": why} for k in row.metrics}
        else:
            row.difference = paired_difference(row.held_out, reference.held_out, list(row.metrics), n, seed)
    return time.perf_counter() - started
