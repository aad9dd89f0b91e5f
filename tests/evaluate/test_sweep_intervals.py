"""Every metric of every sweep row with its bootstrap interval, its paired difference to a reference row
(`python -m evaluate sweep --reference`), and sweep.html with its forest plot.

The resampled metrics are checked against scikit-survival and scikit-learn on the drawn patients (duplicates
included); the sweep on planted cohorts: an interval holds its point and narrows with more patients, the same
store twice differs by exactly 0 [0, 0], a store with the signal beats one of noise with an interval that excludes
0, grade folds missing a grade say why a metric or a resample could not be scored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score

from evaluate import survival_metrics as sm
from evaluate.abmil_settings import TrainSettings
from evaluate.cli import main
from evaluate.cohort import CohortSettings
from evaluate.grade import _auc, _qwk, resampled_grade_metrics
from evaluate.sweep_eval import SweepSettings, evaluate_sweep
from store.embedding_store import EmbeddingStore
from tests.evaluate.helpers import planted_cohort

pytestmark = [pytest.mark.xdist_group("test_sweep_intervals"),  # module fixtures built once, on one worker
              pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")]

SURVIVAL = ("harrell_c", "uno_c", "mean_auc", "ibs")
GRADE = ("balanced_accuracy", "macro_f1", "qwk", "auc")


def _fold(seed: int, n_train: int = 60, n_test: int = 25):
    """A training and a held-out fold with ties in time, the held-out one censored at the training horizon."""
    rng = np.random.default_rng(seed)
    times = np.round(rng.exponential(800, n_train + n_test) / 50) * 50 + 10
    events = rng.random(n_train + n_test) < 0.6
    train, test = sm.surv(times[:n_train], events[:n_train]), sm.surv(times[n_train:], events[n_train:])
    tau, _ = sm.ipcw_horizon(train)
    truncated = sm.censor_at(test, tau)
    risk = -np.log(times[n_train:]) + rng.normal(0, 1, n_test)
    return train, truncated, risk, tau


def _draws(size: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    counts = sm.resample_counts(np.random.default_rng(seed), size, n)
    return counts, [np.repeat(np.arange(size), c.astype(int)) for c in counts]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resampled_survival_metrics_equal_scikit_survival_on_the_drawn_patients(seed):
    train, test, risk, tau = _fold(seed)
    weights = sm.ipcw_weights(train, test)
    times = sm.auc_times(test)
    grid = sm.ibs_grid(test)
    probs = np.exp(-np.outer(np.exp(risk - risk.mean()), grid) / 900)  # any curves falling with time
    losses = sm.brier_losses(train, test, probs, grid)
    counts, draws = _draws(len(test), 40, seed)
    counts = np.vstack([np.ones(len(test)), counts])  # row 0: the fold itself, the metric's point estimate
    draws = [np.arange(len(test)), *draws]
    harrell = sm.resampled_harrell_c(counts, test["time"], test["event"], risk)
    uno = sm.resampled_uno_c(counts, test, weights, risk)
    auc = sm.resampled_mean_auc(counts, test, weights, times, risk)
    ibs = sm.resampled_ibs(counts, losses, grid)
    compared = {"uno": 0, "auc": 0, "ibs": 0}
    for b, d in enumerate(draws):
        drawn = test[d]
        if sm.has_comparable_pair(drawn["time"], drawn["event"]):
            assert harrell[b] == pytest.approx(sm.harrell_c(drawn["time"], drawn["event"], risk[d]), abs=1e-10)
            assert uno[b] == pytest.approx(concordance_index_ipcw(train, drawn, risk[d], tau=tau)[0], abs=1e-10)
            compared["uno"] += 1
        inside = drawn["time"].min() <= times.min() and times.max() < drawn["time"].max()
        if inside and np.isfinite(auc[b]):  # scikit-survival refuses times outside the drawn follow-up
            assert auc[b] == pytest.approx(cumulative_dynamic_auc(train, drawn, risk[d], times)[1], abs=1e-10)
            compared["auc"] += 1
        if drawn["time"].min() <= grid.min() and grid.max() < drawn["time"].max():
            assert ibs[b] == pytest.approx(integrated_brier_score(train, drawn, probs[d], grid), abs=1e-10)
            compared["ibs"] += 1
    assert min(compared.values()) >= 5, compared
    point = sm.fold_metrics(train, test, risk, lambda t: np.exp(-np.outer(np.exp(risk - risk.mean()), t) / 900))
    assert (uno[0], auc[0], ibs[0]) == pytest.approx((point["uno_c"], point["mean_auc"], point["ibs"]), abs=1e-10)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_resampled_grade_metrics_equal_scikit_learn_on_the_drawn_patients(n_classes):
    rng = np.random.default_rng(n_classes)
    size = 14
    truth = rng.integers(0, n_classes, size)
    proba = rng.dirichlet(np.ones(n_classes), size)
    proba[:3] = proba[3]  # tied probabilities
    predicted = proba.argmax(axis=1)
    counts, draws = _draws(size, 60, n_classes)
    got = resampled_grade_metrics(counts, truth, predicted, proba, n_classes)
    undefined = {"qwk": 0, "auc": 0}
    for b, d in enumerate(draws):
        y, pred, p = truth[d], predicted[d], proba[d]
        assert got["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
        f1 = f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0)
        assert got["macro_f1"][b] == pytest.approx(f1, abs=1e-12)
        for key, metric in (("qwk", lambda: _qwk(y, pred, n_classes)), ("auc", lambda: _auc(y, p, n_classes))):
            value, why = sm.computed(metric)
            if why is None:
                assert got[key][b] == pytest.approx(value, abs=1e-12), key
            else:
                assert np.isnan(got[key][b]), (key, why)
                undefined[key] += 1
    assert n_classes == 2 or undefined["auc"] > 0  # 14 patients drawn from 4 grades: some resample lacks one


def _sweep(stores, table, out: Path, tasks=("OS", "grade"), heads=("coxph",), poolings=("mean",), folds=3,
           references=(), split=None):
    settings = SweepSettings(list(stores), CohortSettings([str(table)], folds=folds, split=split), tasks=tasks,
                             heads=heads, grade_heads=("logreg",), poolings=poolings, references=references,
                             max_tiles=16, abmil=TrainSettings(epochs=2))  # MIL heads at CI cost
    evaluation = evaluate_sweep(settings, out, config={}, log=lambda line: None)
    evaluation.write(out)
    return evaluation, json.loads((out / "sweep.json").read_text())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One planted cohort of 100 patients seen by an encoder with the signal and by one whose tiles are mostly
    noise; and its clinical table cut to the first 25 patients (the sweep joins only those)."""
    root = tmp_path_factory.mktemp("planted")
    strong, table = planted_cohort(root, patients=100, seed=4, noise=1.4, name="strong", encoder="strong-encoder")
    noise, _ = planted_cohort(root, patients=100, seed=4, noise=30.0, name="noise", encoder="noise-encoder")
    quarter = root / "quarter.csv"
    quarter.write_text("\n".join(table.read_text().splitlines()[:26]) + "\n")
    return {"strong": strong, "noise": noise, "table": table, "quarter": quarter}


def _width(row: dict, metric: str) -> float:
    return row[f"{metric}_ci95_high"] - row[f"{metric}_ci95_low"]


def test_each_interval_holds_its_point_and_narrows_with_more_patients(planted, tmp_path):
    _, small = _sweep([planted["strong"]], planted["quarter"], tmp_path / "small")
    _, big = _sweep([planted["strong"]], planted["table"], tmp_path / "big")
    assert {r["patients"] for r in small["rows"]} == {25} and {r["patients"] for r in big["rows"]} == {100}
    for sweep in (small, big):
        for row in sweep["rows"]:
            assert not row["error"], row
            for metric in SURVIVAL if row["task"] != "grade" else GRADE:
                assert row[f"{metric}_ci95_low"] <= row[f"{metric}_mean"] <= row[f"{metric}_ci95_high"], (metric, row)
                assert row["intervals"][metric]["resamples"] == 200
    for row_small, row_big in zip(small["rows"], big["rows"]):
        for metric in SURVIVAL if row_small["task"] != "grade" else GRADE:
            assert row_big["intervals"][metric]["folds"] == [0, 1, 2]
            assert _width(row_big, metric) < 0.8 * _width(row_small, metric), (metric, row_small, row_big)
    assert small["bootstrap"]["resamples"] == 200 and small["bootstrap"]["seconds"] >= 0


def test_the_same_store_twice_differs_by_exactly_zero_in_every_metric(planted, tmp_path):
    evaluation, sweep = _sweep([planted["strong"], planted["strong"]], planted["table"], tmp_path,
                               heads=("coxnet", "coxph"), poolings=("mean", "max"))
    assert sweep["reference_rows"] == {"OS": "strong-encoder/OS/coxnet/mean", "grade": "strong-encoder/grade/logreg/mean"}
    twins = {(r["task"], r["head"], r["pooling"]): r for r in sweep["rows"] if r["encoder"] == "strong-encoder#2"}
    firsts = {(r["task"], r["head"], r["pooling"]): r for r in sweep["rows"] if r["encoder"] == "strong-encoder"}
    for key in (("OS", "coxnet", "mean"), ("grade", "logreg", "mean")):  # each the twin of its task's reference
        for metric in SURVIVAL if key[0] == "OS" else GRADE:
            delta = twins[key]["difference_to_reference"][metric]
            assert delta["difference"] == 0.0 and delta["ci95"] == [0.0, 0.0] and delta["patients"] == 100, (key, metric)
    for key, row in twins.items():  # and the others differ from it as their first-store copy does
        for metric in SURVIVAL if key[0] == "OS" else GRADE:
            first = firsts[key]["difference_to_reference"].get(metric) or {"difference": 0.0, "ci95": [0.0, 0.0]}
            assert row[f"{metric}_diff"] == first["difference"] and row["difference_to_reference"][metric]["ci95"] == \
                first["ci95"]
    # Harrell's C of the twin minus the first store, as the pairwise encoder comparison gives it
    pair = next(d for d in sweep["paired_differences"] if (d["head"], d["pooling"]) == ("coxnet", "mean"))
    assert pair["difference"] == 0.0 and pair["ci95"] == [0.0, 0.0]
    assert "OS: row - strong-encoder/OS/coxnet/mean [95% CI]" in "\n".join(evaluation.lines())


def test_the_store_with_the_signal_beats_the_noise_with_an_interval_excluding_zero(planted, tmp_path):
    _, sweep = _sweep([planted["noise"], planted["strong"]], planted["table"], tmp_path)
    rows = {(r["encoder"], r["task"]): r for r in sweep["rows"]}
    assert rows[("noise-encoder", "OS")]["reference"] and rows[("noise-encoder", "grade")]["reference"]
    survival, grade = rows[("strong-encoder", "OS")], rows[("strong-encoder", "grade")]
    for metric in ("harrell_c", "uno_c", "mean_auc"):
        assert survival[f"{metric}_diff_ci95_low"] > 0, (metric, survival)
    assert survival["ibs_diff_ci95_high"] < 0  # lower is better
    assert grade["qwk_diff_ci95_low"] > 0 and grade["auc_diff_ci95_low"] > 0, grade
    noise_c = rows[("noise-encoder", "OS")]["harrell_c_mean"]
    assert survival["harrell_c_diff"] == pytest.approx(survival["harrell_c_mean"] - noise_c, abs=1e-9)
    (pair,) = sweep["paired_differences"]  # the pairwise comparison draws the same resamples
    assert pair["difference"] == pytest.approx(survival["harrell_c_diff"], abs=1e-12)
    assert pair["ci95"] == pytest.approx([survival["harrell_c_diff_ci95_low"], survival["harrell_c_diff_ci95_high"]],
                                         abs=1e-12)
    with open(tmp_path / "sweep.csv") as f:
        header = next(csv.reader(f))
    assert {"harrell_c_ci95_low", "harrell_c_diff", "harrell_c_diff_ci95_high", "qwk_diff_ci95_low",
            "reference"} <= set(header)


def test_sweep_html_names_every_row_and_links_its_forest_plot(planted, tmp_path):
    _sweep([planted["noise"], planted["strong"]], planted["table"], tmp_path, heads=("coxph", "abmil-cox"))
    page = (tmp_path / "sweep.html").read_text()
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    for row in sweep["rows"]:
        aggregator = "tiles (MIL)" if row["pooling"] == "tiles" else row["pooling"]
        cells = f'<td class="text">{row["encoder"]}</td><td class="text">{row["head"]}</td>' \
                f'<td class="text">{aggregator}</td>'
        assert cells in page, cells
    assert page.count('<tr class="reference">') == 2 and "<h2>OS (survival)</h2>" in page
    assert "<h2>grade</h2>" in page
    assert '<th colspan="2">Harrell&#x27;s C</th>' in page and "<th>Δ to reference</th>" in page
    assert 'src="sweep_forest.png"' in page and 'href="sweep_forest.png"' in page and "<script" not in page
    assert (tmp_path / "sweep_forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_grades(tmp_path_factory):
    """24 patients of grade G1 or G4; a split whose fold 0 holds G4 patients only (its AUC and QWK are
    undefined), and one whose every fold holds one grade (no fold defines QWK)."""
    root = tmp_path_factory.mktemp("grades")
    url, table = planted_cohort(root, patients=24, risk_levels=(-1.5, 1.5), noise=0.3)
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    g1, g4 = [r[0] for r in rows if r[2] == "G1"], [r[0] for r in rows if r[2] == "G4"]
    one = {p: 0 for p in g4[:6]} | {p: 1 + i % 2 for i, p in enumerate(g4[6:] + g1)}
    every = {p: 2 * (i % 2) for i, p in enumerate(g1)} | {p: 1 + 2 * (i % 2) for i, p in enumerate(g4)}
    splits = []
    for name, folds in (("one_pure_fold", one), ("every_fold_pure", every)):
        path = root / f"{name}.csv"
        path.write_text("patient_id,fold\n" + "".join(f"{p},{f}\n" for p, f in folds.items()))
        splits.append(str(path))
    return url, table, *splits


def test_grade_intervals_on_folds_missing_a_grade_say_why(two_grades, tmp_path):
    url, table, one_pure_fold, every_fold_pure = two_grades
    _, sweep = _sweep([url], table, tmp_path / "one", tasks=("grade",), split=one_pure_fold)
    (row,) = sweep["rows"]
    for metric in ("qwk", "auc"):  # fold 0 defines neither: the interval is over folds 1 and 2
        interval = row["intervals"][metric]
        assert "0" in row["not_computed"][metric] and interval["folds"] == [1, 2], (metric, row)
        assert interval["ci95"][0] <= row[f"{metric}_mean"] <= interval["ci95"][1]
        assert not interval["skipped"] or "resample" in interval["skipped_because"]
    assert row["intervals"]["balanced_accuracy"]["folds"] == [0, 1, 2]

    _, sweep = _sweep([url], table, tmp_path / "every", tasks=("grade",), split=every_fold_pure)
    (row,) = sweep["rows"]
    assert row["qwk_mean"] is None and row["qwk_ci95_low"] is None
    assert "no held-out fold defines it" in row["intervals"]["qwk"]["not_computed"]
    page = (tmp_path / "every" / "sweep.html").read_text()
    assert "n/a<span class=\"why\">QWK is undefined on this fold" in page


def test_cli_reference_picks_that_row_and_an_unknown_one_names_the_rows(planted, tmp_path, capsys):
    base = ["sweep", "--store", planted["strong"], "--clinical", str(planted["table"]), "--tasks", "OS", "grade",
            "--heads", "coxnet", "coxph", "--grade-heads", "logreg", "--poolings", "mean", "max", "--folds", "3"]
    assert main([*base, "--reference", "coxph/max", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    sweep = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert sweep["reference_rows"] == {"OS": "OS/coxph/max", "grade": "grade/logreg/mean"}  # no match: the first
    rows = {(r["task"], r["head"], r["pooling"]): r for r in sweep["rows"]}
    reference = rows[("OS", "coxph", "max")]
    assert reference["reference"] and reference["difference_to_reference"] == {}
    for key, row in rows.items():
        if key[0] == "OS" and key != ("OS", "coxph", "max"):
            assert row["harrell_c_diff"] == pytest.approx(row["harrell_c_mean"] - reference["harrell_c_mean"], abs=1e-9)
    assert "OS: row - OS/coxph/max [95% CI]" in out and "* OS/coxph/max" in out
    assert "note: --reference coxph/max names no grade row: grade rows are compared with the first fitted one, " \
           "grade/logreg/mean" in out
    encoder = EmbeddingStore.open(planted["strong"]).spec["encoder"]["name"]  # one store: its encoder in the page
    assert f'<td class="text">{encoder}</td><td class="text">coxph</td>' in (tmp_path / "a" / "sweep.html").read_text()

    code = main([*base, "--reference", "coxph/median", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "--reference coxph/median matches no row of the sweep" in err, err
    assert "OS/coxnet/mean, OS/coxnet/max, OS/coxph/mean, OS/coxph/max, grade/logreg/mean, grade/logreg/max" in err
    assert not (tmp_path / "b" / "sweep.json").exists()  # refused before anything was fitted
