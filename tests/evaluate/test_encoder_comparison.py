"""Comparing encoders from the cache: `python -m evaluate sweep --store A B` fits every head on the same
patients and folds per store and gives C-index differences with a bootstrap that resamples patients jointly.

The interval is checked against a paired bootstrap computed here by hand on the same resamples, with one
scikit-survival call per resample and store (not the pair-count matrices the library uses)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from tests.evaluate.helpers import planted_cohort
from tests.readme import run_in_process, to_argv

pytestmark = pytest.mark.xdist_group("test_encoder_comparison")  # its module fixture is built once, on one worker

COMPARE = ("python -m evaluate sweep --store STORE_A STORE_B [STORE ...] --clinical TABLE --tasks OS "
           "[--heads coxnet coxph] --poolings mean --out DIR")
FAST = ["--heads", "coxph"]


def _sweep(cwd, stores, table):
    """The README's command on these stores, in the test's own working directory (its --out is relative)."""
    run = to_argv(COMPARE, {"STORE_A": stores[0], "STORE_B": stores[1], "TABLE": str(table), "DIR": "out"})
    run.argv[run.argv.index("--tasks"):run.argv.index("--tasks")] = FAST  # one head: the comparison is the point
    result = run_in_process(run, cwd)
    assert result.code == 0, result.log[-3000:]
    return result, json.loads((cwd / "out" / "sweep.json").read_text())


def _hand_paired_bootstrap(rows_a, rows_b, n=200, seed=0):
    """Per fold (sorted, one generator): draw the fold's patients with replacement; C of both stores by
    concordance_index_censored on the drawn patients; the resample's difference is the mean over folds."""
    rng = np.random.default_rng(seed)
    risk_b = {r["patient_id"]: r["risk"] for r in rows_b}
    per_fold = []
    for fold in sorted({r["fold"] for r in rows_a}):
        fold_rows = [r for r in rows_a if r["fold"] == fold]
        t = np.array([r["time"] for r in fold_rows])
        e = np.array([r["event"] for r in fold_rows], bool)
        a = np.array([r["risk"] for r in fold_rows])
        b = np.array([risk_b[r["patient_id"]] for r in fold_rows])
        draws = rng.integers(0, len(fold_rows), (n, len(fold_rows)))
        deltas = []
        for d in draws:
            try:
                deltas.append(concordance_index_censored(e[d], t[d], b[d])[0] - concordance_index_censored(e[d], t[d], a[d])[0])
            except Exception:  # no comparable pair in this draw: the resample does not count
                deltas.append(np.nan)
        per_fold.append(deltas)
    values = np.mean(per_fold, axis=0)
    values = values[np.isfinite(values)]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _predictions(cwd):
    by_encoder = defaultdict(list)
    with open(cwd / "out" / "sweep_predictions.csv") as f:
        for row in csv.DictReader(f):
            by_encoder[row["encoder"]].append({"patient_id": row["patient_id"], "fold": int(row["fold"]),
                                               "time": float(row["time"]), "event": row["event"] == "1",
                                               "risk": float(row["risk"])})
    return by_encoder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One planted cohort seen by a weaker and a stronger encoder (more and less embedding noise), and a
    store of the stronger one's family that lacks 10 of the patients."""
    root = tmp_path_factory.mktemp("encoders")
    weak, table = planted_cohort(root, patients=90, seed=4, signal=1.0, noise=2.6, name="weak", encoder="weak-encoder")
    strong, _ = planted_cohort(root, patients=90, seed=4, signal=1.0, noise=1.4, name="strong", encoder="strong-encoder")
    fewer, _ = planted_cohort(root / "fewer", patients=80, seed=4, name="fewer", encoder="other")  # PT0000-PT0079
    return {"weak": weak, "strong": strong, "fewer": fewer, "table": table}


@pytest.mark.readme(COMPARE)
def test_two_encoders_difference_matches_a_hand_computed_paired_bootstrap(cohort, tmp_path):
    result, sweep = _sweep(tmp_path, [cohort["weak"], cohort["strong"]], cohort["table"])
    rows = {r["encoder"]: r for r in sweep["rows"]}
    c_weak, c_strong = rows["weak-encoder"]["harrell_c_mean"], rows["strong-encoder"]["harrell_c_mean"]
    assert 0.6 < c_weak < c_strong < 0.8 and c_strong - c_weak < 0.1, (c_weak, c_strong)  # a modest gap
    (difference,) = sweep["paired_differences"]
    assert (difference["a"], difference["b"], difference["patients"]) == ("weak-encoder", "strong-encoder", 90)
    assert difference["difference"] == pytest.approx(c_strong - c_weak, abs=1e-12)
    predictions = _predictions(tmp_path)
    hand = _hand_paired_bootstrap(predictions["weak-encoder"], predictions["strong-encoder"])
    assert difference["ci95"] == pytest.approx(hand, abs=1e-12)
    assert "paired differences of Harrell's C" in result.stdout and "strong-encoder vs weak-encoder" in result.stdout
    for label in ("weak-encoder", "strong-encoder"):  # each store's C with its own interval in the table
        lo, hi = rows[label]["harrell_c_ci95_low"], rows[label]["harrell_c_ci95_high"]
        assert lo < rows[label]["harrell_c_mean"] < hi


def test_the_same_store_twice_differs_by_exactly_zero(cohort, tmp_path):
    _, sweep = _sweep(tmp_path, [cohort["strong"], cohort["strong"]], cohort["table"])
    (difference,) = sweep["paired_differences"]
    assert (difference["a"], difference["b"]) == ("strong-encoder", "strong-encoder#2")
    assert difference["difference"] == 0.0 and difference["ci95"] == [0.0, 0.0]


def test_stores_with_different_patients_are_compared_on_the_shared_ones(cohort, tmp_path):
    result, sweep = _sweep(tmp_path, [cohort["strong"], cohort["fewer"]], cohort["table"])
    assert sweep["patients_left_out"] == {"strong-encoder": 10, "other": 0}
    assert "10 patients of strong-encoder are not in every store" in result.stderr
    assert {r["patients"] for r in sweep["rows"]} == {80} and sweep["paired_differences"][0]["patients"] == 80
