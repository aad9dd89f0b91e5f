"""Small cohorts and folds that leave a metric undefined, through the CLI as a user runs it (issue 27).

A CoxPH that overflowed on 16 patients made scikit-survival's integrated_brier_score raise "Input estimate
contains infinity": `sweep` and `survival` exited 1 with a traceback and wrote nothing. A grade fold whose
patients and predictions were all one grade gave QWK NaN: `qwk nan ± nan` printed, bare NaN (not JSON) in
metrics.json and sweep.json, and the NaN row named best. A table without `OS.time` read as "no patient has
endpoint OS". Now: a null with its reason, strict JSON, no null row ranked, the missing column named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evaluate.cli import main
from tests.evaluate.helpers import planted_cohort


def _strict(path: Path) -> dict:
    """The file as a strict JSON parser reads it: NaN or Infinity is an error, not a number."""
    def refuse(token: str) -> None:
        raise ValueError(f"{path} holds {token}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _no_traceback(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err[-3000:]
    return captured.out, captured.err


@pytest.fixture(scope="module")
def sixteen_patients(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    # Seed 2 and 4 folds from seed 0: one training fold on which CoxPH's baseline survival overflows.
    return planted_cohort(tmp_path_factory.mktemp("sixteen"), patients=16, seed=2)


def test_a_cox_head_that_overflows_on_16_patients_gives_a_null_ibs_with_its_reason(sixteen_patients, tmp_path,
                                                                                   capsys):
    url, table = sixteen_patients
    code = main(["sweep", "--store", url, "--clinical", str(table), "--tasks", "OS", "--heads", "coxnet", "coxph",
                 "--poolings", "mean", "--folds", "4", "--out", str(tmp_path / "sweep")])
    out, err = _no_traceback(capsys)
    assert code == 0, err[-2000:]
    rows = {row["head"]: row for row in _strict(tmp_path / "sweep" / "sweep.json")["rows"]}
    assert set(rows) == {"coxnet", "coxph"} and not any(row["error"] for row in rows.values()), rows
    assert math.isfinite(rows["coxnet"]["harrell_c_mean"]) and math.isfinite(rows["coxph"]["harrell_c_mean"])
    reasons = rows["coxph"]["not_computed"]["ibs"]  # {fold: reason}, in the sweep's JSON
    assert any("not finite" in why for why in reasons.values()), reasons
    assert "best OS: " in out

    code = main(["survival", "--store", url, "--clinical", str(table), "--head", "coxph", "--folds", "4",
                 "--out", str(tmp_path / "coxph")])
    out, err = _no_traceback(capsys)
    assert code == 0, err[-2000:]
    metrics = _strict(tmp_path / "coxph" / "metrics.json")
    failed = [fold for fold in metrics["folds"] if fold["ibs"] is None]
    assert failed and all("not finite" in fold["not_computed"]["ibs"] for fold in failed), metrics["folds"]
    ibs = metrics["summary"]["ibs"]
    assert ibs["folds"] == 4 - len(failed) and set(ibs["not_computed_in_folds"]) == {str(f["fold"]) for f in failed}
    assert metrics["summary"]["harrell_c"]["folds"] == 4 and (tmp_path / "coxph" / "predictions.csv").is_file()
    assert "ibs" in out and "not in 1" in out


@pytest.fixture(scope="module")
def two_grades(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Path]:
    """24 patients of grade G1 or G4, far apart (logistic regression gets every held-out grade right), a split
    with one fold of G4 patients only, and a split whose every fold holds one grade."""
    root = tmp_path_factory.mktemp("grades")
    url, table = planted_cohort(root, patients=24, risk_levels=(-1.5, 1.5), noise=0.3)
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    g1 = [r[0] for r in rows if r[2] == "G1"]
    g4 = [r[0] for r in rows if r[2] == "G4"]
    assert len(g1) >= 4 and len(g4) >= 10, (g1, g4)
    one = {p: 0 for p in g4[:6]} | {p: 1 + i % 2 for i, p in enumerate(g4[6:] + g1)}
    every = {p: 2 * (i % 2) for i, p in enumerate(g1)} | {p: 1 + 2 * (i % 2) for i, p in enumerate(g4)}
    splits = []
    for name, folds in (("one_pure_fold", one), ("every_fold_pure", every)):
        splits.append(root / f"{name}.csv")
        splits[-1].write_text("patient_id,fold\n" + "".join(f"{p},{f}\n" for p, f in folds.items()))
    return url, table, *splits


def _grade(url: str, table, split, out_dir, capsys) -> tuple[dict, str]:
    """`evaluate grade` with this split: (its strict metrics.json, what it printed)."""
    code = main(["grade", "--store", url, "--clinical", str(table), "--split", str(split), "--out", str(out_dir)])
    out, err = _no_traceback(capsys)
    assert code == 0, err[-2000:]
    return _strict(out_dir / "metrics.json"), out


def test_grade_averages_qwk_over_the_folds_that_define_it(two_grades, tmp_path, capsys):
    url, table, one_pure_fold, _ = two_grades
    metrics, out = _grade(url, table, one_pure_fold, tmp_path / "g", capsys)
    pure = next(fold for fold in metrics["folds"] if fold["fold"] == 0)
    assert pure["qwk"] is None and "all one grade" in pure["not_computed"]["qwk"], pure
    qwk = metrics["summary"]["qwk"]
    assert qwk["folds"] == 2 and math.isfinite(qwk["mean"]) and set(qwk["not_computed_in_folds"]) == {"0"}, qwk
    assert "nan" not in out.lower(), out


def test_a_qwk_no_fold_defines_is_null_with_reasons_and_never_best(two_grades, tmp_path, capsys):
    url, table, _, every_fold_pure = two_grades
    metrics, out = _grade(url, table, every_fold_pure, tmp_path / "g", capsys)
    qwk = metrics["summary"]["qwk"]
    assert qwk["mean"] is None and len(qwk["not_computed_in_folds"]) == 4, qwk
    assert "nan" not in out.lower() and "qwk" in out and "not computed" in out, out

    code = main(["sweep", "--store", url, "--clinical", str(table), "--tasks", "grade", "--grade-heads", "logreg",
                 "--poolings", "mean", "--split", str(every_fold_pure), "--out", str(tmp_path / "sweep")])
    out, err = _no_traceback(capsys)
    assert code == 0, err[-2000:]
    sweep = _strict(tmp_path / "sweep" / "sweep.json")
    (row,) = sweep["rows"]
    assert row["qwk_mean"] is None and len(row["not_computed"]["qwk"]) == 4, row
    assert "grade" not in sweep["best"] and "best grade" not in out and "nan" not in out.lower(), (sweep["best"], out)


def test_a_table_without_os_time_names_the_column_and_the_file(sixteen_patients, tmp_path, capsys):
    url, table = sixteen_patients
    header, *rows = table.read_text().splitlines()
    drop = header.split(",").index("OS.time")
    no_time = tmp_path / "no_os_time.csv"
    no_time.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop)
                                 for line in [header, *rows]) + "\n")
    code = main(["survival", "--store", url, "--clinical", str(no_time), "--out", str(tmp_path / "s")])
    _, err = _no_traceback(capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, lines)
    assert "'OS.time'" in lines[0] and str(no_time) in lines[0] and "no patient" not in lines[0], lines

    code = main(["sweep", "--store", url, "--clinical", str(no_time), "--tasks", "OS", "grade", "--heads", "coxph",
                 "--grade-heads", "logreg", "--poolings", "mean", "--folds", "3", "--out", str(tmp_path / "sweep")])
    _, err = _no_traceback(capsys)
    assert code == 0, err[-2000:]
    rows_by_task = {row["task"]: row for row in _strict(tmp_path / "sweep" / "sweep.json")["rows"]}
    assert "'OS.time'" in rows_by_task["OS"]["error"] and str(no_time) in rows_by_task["OS"]["error"], rows_by_task
    assert rows_by_task["grade"]["error"] is None, rows_by_task


def test_a_fold_whose_training_part_holds_one_grade_is_a_null_the_others_are_scored(two_grades, tmp_path, capsys):
    """Every G1 patient in fold 0's test part leaves its training part all G4: that fold cannot be fitted and is
    nulls with the reason; folds 1 and 2 are scored (the run used to stop with exit 2)."""
    url, table, *_ = two_grades
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    g1 = [r[0] for r in rows if r[2] == "G1"]
    g4 = [r[0] for r in rows if r[2] == "G4"]
    split = tmp_path / "g1_in_fold0.csv"
    folds = {p: 0 for p in g1 + g4[:2]} | {p: 1 + i % 2 for i, p in enumerate(g4[2:])}
    split.write_text("patient_id,fold\n" + "".join(f"{p},{f}\n" for p, f in folds.items()))
    metrics, out = _grade(url, table, split, tmp_path / "g", capsys)
    failed = next(fold for fold in metrics["folds"] if fold["fold"] == 0)
    assert failed["accuracy"] is None and "holds one grade only (G4)" in failed["fit_failed"], failed
    assert metrics["summary"]["accuracy"]["folds"] == 2 and "0" in metrics["summary"]["accuracy"]["not_computed_in_folds"]
