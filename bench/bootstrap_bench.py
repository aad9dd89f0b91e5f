"""The bootstrap CI of Harrell's C: one scikit-survival call per resample (the definition) vs the pair
counts of evaluate.survival_metrics.bootstrap_ci, side by side on the same folds and the same resamples.

Each held-out fold of a cross-validation gets 200 resamples; a sweep over heads, poolings and tasks runs
this hundreds of times. Prints seconds per fold for each way, the ratio, and the largest difference of the
two CIs (they must agree to rounding).

    python bench/bootstrap_bench.py [--sizes 24 100 200 --resamples 200 --repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sksurv.metrics import concordance_index_censored

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate import survival_metrics as sm  # noqa: E402


def by_calls(times: np.ndarray, events: np.ndarray, risk: np.ndarray, n: int, seed: int,
             level: float = 0.95) -> tuple[float, float, int] | None:
    """The definition: one scikit-survival call per resample, the resamples bootstrap_ci draws; (lo, hi,
    skipped), or None when no resample holds a comparable pair. tests/evaluate/test_bootstrap_ci.py uses it."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(times), len(times))
        if sm.has_comparable_pair(times[idx], events[idx]):
            values.append(concordance_index_censored(events[idx], times[idx], risk[idx])[0])
    if not values:
        return None
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)), n - len(values)


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 100, 200], help="held-out patients per fold")
    parser.add_argument("--resamples", type=int, default=sm.BOOTSTRAP_RESAMPLES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'patients':>8} {'sksurv calls s':>15} {'pair counts s':>14} {'ratio':>7} {'max |CI diff|':>14}")
    for size in args.sizes:
        rng = np.random.default_rng(size)
        risk = rng.normal(size=size)
        times = np.round(rng.exponential(900 * np.exp(-risk)), 0) + 1
        events = rng.random(size) < 0.5
        slow, expected = best_of(args.repeats, lambda: by_calls(times, events, risk, args.resamples, 0)[:2])
        fast, got = best_of(args.repeats, lambda: sm.bootstrap_ci(times, events, risk, args.resamples, 0)[:2])
        diff = float(np.max(np.abs(np.subtract(expected, got))))
        print(f"{size:>8} {slow:>15.3f} {fast:>14.4f} {slow / fast:>6.0f}x {diff:>14.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
