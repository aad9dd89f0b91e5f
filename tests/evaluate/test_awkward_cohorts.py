"""Awkward but realistic clinical tables end to end through every survival head and the sweep: each run
exits 0 with metrics or exits 2 with one clear sentence; never a traceback, never a NaN mean without a
reason. (A cohort whose longest follow-up is an event crashed `survival --head coxnet` inside a joblib
worker with scikit-survival's "censoring survival function is zero"; nothing was written.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluate.cli import main
from evaluate.survival import HEADS
from tests.evaluate.helpers import planted_cohort

PATIENTS = 120
ABMIL_FAST = ["--epochs", "1", "--max-tiles", "16"]  # the ABMIL heads at 1 epoch and 16 tiles: CI time
SWEEP_HEADS = ["coxnet", "abmil-cox"]  # one pooled-feature head and one bag head through the sweep


def _cdr(path, ids, times, events, extra=None):
    rows = ["patient_id,cancer_type,grade,age,stage,OS,OS.time"]
    for i, (p, t, e) in enumerate(zip(ids, times, events)):
        age, stage = (extra or {}).get(i, (50 + i % 30, "Stage II"))
        rows.append(f"{p},DEMO,G2,{age},{stage},{e},{t}")
    path.write_text("\n".join(rows) + "\n")


def _tables(root, ids):
    """name → (table path, exit code every run must give)."""
    rng = np.random.default_rng(7)
    base = np.round(rng.exponential(900, PATIENTS) + 1, 1)
    events = (rng.random(PATIENTS) < 0.55).astype(int)
    tables = {}

    def add(name, times, ev, code=0, writer=_cdr, **kw):
        path = root / f"{name}.csv"
        writer(path, ids, times, ev, **kw)
        tables[name] = (path, code)

    ev = events.copy()
    ev[np.argmax(base)] = 1
    add("longest_follow_up_an_event", base, ev)
    ev = events.copy()
    ev[np.argmax(base)] = 0
    add("longest_follow_up_censored", base, ev)
    add("ninety_percent_censored", base, (rng.random(PATIENTS) < 0.1).astype(int))
    add("no_censoring", base, np.ones(PATIENTS, int))
    one = np.zeros(PATIENTS, int)
    one[3] = 1
    add("one_event", base, one, code=2)
    add("all_censored", base, np.zeros(PATIENTS, int), code=2)
    add("tied_times", np.maximum(365, np.round(base / 365) * 365), events)
    outlier = base.copy()
    outlier[np.argsort(base)[-2:]] = base.max() * 20  # test times far past any training follow-up
    add("follow_up_outliers", outlier, events)
    add("zero_and_tiny_times", np.where(rng.random(PATIENTS) < 0.1, 0.0, base), events)
    missing = {i: ("[Not Available]", "[Not Available]") for i in range(0, PATIENTS, 3)}
    add("cdr_missing_age_and_stage", base, events, extra=missing)

    def survpath(path, ids_, times, ev):  # months, censorship = 1 means no event
        path.write_text("case_id,slide_id,survival_months,censorship\n" + "".join(
            f"{p},{p}-S0,{t / 30.4375:.2f},{1 - e}\n" for p, t, e in zip(ids_, times, ev)))
    add("survpath_months", base, events, writer=survpath)

    def few(path, ids_, times, ev):  # 20 patients: the training parts are near the heads' minimum
        _cdr(path, ids_[:20], times[:20], np.r_[np.ones(8, int), np.zeros(12, int)])
    add("twenty_patients", base, events, writer=few)
    return tables


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    url, _ = planted_cohort(root, patients=PATIENTS)
    return url, _tables(root, [f"PT{p:04d}" for p in range(PATIENTS)])


def _check_run(code, expected, out, capsys, what):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (what, captured.err[-3000:])
    assert code == expected, (what, code, captured.err[-2000:], captured.out[-2000:])
    if code == 2:
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, lines)
        return None
    return json.loads(out.read_text())


def _no_silent_nan(summary, what):
    for key, value in summary.items():
        if not isinstance(value, dict) or "mean" not in value:
            continue
        if value["mean"] is None:
            assert value.get("not_computed_in_folds"), (what, key, value)  # null, with the reasons
        else:
            assert math.isfinite(value["mean"]) and math.isfinite(value["std"]), (what, key, value)


TABLES = ["longest_follow_up_an_event", "longest_follow_up_censored", "ninety_percent_censored", "no_censoring",
          "one_event", "all_censored", "tied_times", "follow_up_outliers", "zero_and_tiny_times",
          "cdr_missing_age_and_stage", "survpath_months", "twenty_patients"]


@pytest.mark.parametrize("name", TABLES)
def test_every_head_and_the_sweep_on_an_awkward_table(cohort, name, tmp_path, capsys):
    url, tables = cohort
    table, expected = tables[name]
    for head in HEADS:
        out = tmp_path / head
        code = main(["survival", "--store", url, "--clinical", str(table), "--head", head, "--folds", "5",
                     "--out", str(out), *ABMIL_FAST])
        metrics = _check_run(code, expected, out / "metrics.json", capsys, f"{name} {head}")
        if metrics is None:
            continue
        _no_silent_nan(metrics["summary"], f"{name} {head}")
        assert metrics["summary"]["harrell_c"]["mean"] is not None, (name, head, metrics["summary"])
        baseline = metrics["clinical_baseline_age_stage"]
        assert "summary" in baseline or baseline["error"], (name, head)  # beside the results, never instead
        for fold in metrics["folds"]:
            for key in ("harrell_c", "uno_c", "mean_auc", "ibs"):
                assert fold[key] is not None or fold["not_computed"].get(key), (name, head, fold)
    # The sweep's own part on this table (its rows, errors and refusals); each head ran on it just above.
    code = main(["sweep", "--store", url, "--clinical", str(table), "--tasks", "OS", "--heads", *SWEEP_HEADS,
                 "--poolings", "mean", "--grade-heads", "logreg", "--out", str(tmp_path / "sweep"), *ABMIL_FAST])
    sweep = _check_run(code, expected, tmp_path / "sweep" / "sweep.json", capsys, f"{name} sweep")
    if sweep is None:
        assert expected == 2
        return
    for row in sweep["rows"]:
        assert row["error"] or all(v is None or math.isfinite(v) for k, v in row.items() if k.endswith(("_mean", "_std")))
    assert any(not row["error"] for row in sweep["rows"]), sweep["rows"]
