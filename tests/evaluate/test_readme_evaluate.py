"""The README's evaluation commands, run as printed on the README demo's store and outputs, each in a
fresh working directory, in-process (the JVM of METEOR starts once per worker)."""

from __future__ import annotations

import json
import shutil

import pytest

from slidecache.cohorts.splits import read_split
from tests.readme import run_in_process, to_argv

SPLIT = ("python -m evaluate split --store STORE --clinical TABLE [TABLE ...] [--endpoint OS] [--folds 5] "
         "[--site-preserving] [--cancer-type KIRC] --out splits.csv")
IMPORT_SPLIT = "python -m evaluate import-split splits_0.csv splits_1.csv ... [--store STORE] --out splits.csv"
SURVIVAL = ("python -m evaluate survival --store STORE --clinical TABLE [--endpoint OS|DSS|DFI|PFI] "
            "[--head coxnet|coxph|rsf|abmil-cox|abmil-nll] [--pooling mean|cls|max] [--split splits.csv] "
            "[--max-tiles 512 --epochs 20 --lr 2e-4 --ties efron|breslow] [--heatmaps auto SLIDE_ID ...] --out DIR")
GRADE = "python -m evaluate grade --store STORE --clinical TABLE [--head logreg|abmil] [--split splits.csv] --out DIR"
SWEEP = ("python -m evaluate sweep --store STORE --clinical TABLE --tasks OS DSS grade [--heads coxnet coxph rsf "
         "abmil-cox] [--grade-heads logreg abmil] [--poolings mean max] --out DIR")
REPORT = "python -m evaluate report --predictions gen.jsonl --references refs.jsonl [--clinical TABLE --endpoint OS]"


def run(command: str, cwd, **values: str):
    result = run_in_process(to_argv(command, values), cwd)
    assert "Traceback" not in result.log, result.log[-3000:]
    return result


def demo_values(readme_demo) -> dict[str, str]:
    return {"STORE": readme_demo.store, "TABLE": str(readme_demo.out / "clinical.csv"), "DIR": "out"}


@pytest.mark.readme(SPLIT)
def test_split(readme_demo, tmp_path):
    result = run(SPLIT, tmp_path, **demo_values(readme_demo))
    assert result.code == 0 and "80 patients in 5 folds" in result.stdout
    assert sorted(set(read_split(tmp_path / "splits.csv").values())) == [0, 1, 2, 3, 4]


@pytest.mark.readme(IMPORT_SPLIT)
def test_import_split(readme_demo, tmp_path):
    patients = sorted(read_split(readme_demo.out / "splits.csv"))
    halves = [patients[::2], patients[1::2]]
    for k in (0, 1):  # SurvPath-style files of case ids: fold k holds out file k's test column
        train, test = halves[1 - k], halves[k]
        rows = [",train,val,test"] + [f"{i},{train[i] if i < len(train) else ''},,{test[i] if i < len(test) else ''}"
                                      for i in range(max(len(train), len(test)))]
        (tmp_path / f"splits_{k}.csv").write_text("\n".join(rows) + "\n")
    result = run(IMPORT_SPLIT, tmp_path)
    assert result.code == 0 and read_split(tmp_path / "splits.csv") == {p: i % 2 for i, p in enumerate(patients)}


@pytest.mark.readme(SURVIVAL)
def test_survival(readme_demo, tmp_path):
    result = run(SURVIVAL, tmp_path, **demo_values(readme_demo))
    assert result.code == 0, result.log[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["summary"]["harrell_c"]["mean"] > 0.7 and (tmp_path / "out" / "km.png").is_file()
    assert "summary" in metrics["clinical_baseline_age_stage"] or "error" in metrics["clinical_baseline_age_stage"]


@pytest.mark.readme(GRADE)
def test_grade(readme_demo, tmp_path):
    result = run(GRADE, tmp_path, **demo_values(readme_demo))
    assert result.code == 0 and (tmp_path / "out" / "confusion.png").is_file()


@pytest.mark.readme(SWEEP)
def test_sweep(readme_demo, tmp_path):
    result = run(SWEEP, tmp_path, **demo_values(readme_demo))
    assert result.code == 0, result.log[-2000:]
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert "OS" in sweep["best"] and "grade" in sweep["best"] and sweep["encoder_modules_loaded"] == []
    dss = [row for row in sweep["rows"] if row["task"] == "DSS"]
    assert dss and all("DSS" in row["error"] for row in dss)  # the demo table has no DSS: said, not a crash


@pytest.mark.readme(REPORT)
def test_report(readme_demo, tmp_path):
    shutil.copy(readme_demo.out / "reports_heldout.jsonl", tmp_path / "gen.jsonl")
    shutil.copy(readme_demo.out / "annotations.jsonl", tmp_path / "refs.jsonl")
    result = run(REPORT, tmp_path)
    assert result.code == 0 and "BLEU-4" in result.stdout and "ROUGE-L" in result.stdout
