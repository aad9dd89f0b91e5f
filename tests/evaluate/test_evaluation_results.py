"""The library behind `python -m evaluate` (issue 28): each evaluation is a result object that writes the command's
files and gives the lines it prints, so the command only parses and prints, and the demo records a head from the
same object instead of rebuilding the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluate.cli import main
from evaluate.cohort import CohortSettings, open_patients
from evaluate.grade_eval import GradeSettings, run_grade
from evaluate.records import not_estimated
from evaluate.report_eval import ReportSettings, evaluate_reports, run_report
from evaluate.survival_eval import SurvivalSettings, evaluate_survival, run_survival
from evaluate.sweep_eval import SweepSettings, evaluate_sweep
from slidecache.errors import EvaluationError
from tests.evaluate.helpers import planted_cohort
from tests.evaluate.test_report_metrics import REFS, write_jsonl


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return planted_cohort(tmp_path_factory.mktemp("results"), patients=60)


def _without_provenance(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "provenance"}


def _same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    assert _without_provenance(a / names[0]) == _without_provenance(b / names[0])
    for name in names[1:]:
        assert (b / name).is_file()
        if name.endswith(".csv"):
            assert (a / name).read_text() == (b / name).read_text()


def test_a_survival_result_writes_and_prints_what_the_command_does(cohort, tmp_path, capsys):
    url, table = cohort
    cli, lib = tmp_path / "cli", tmp_path / "lib"
    assert main(["survival", "--store", url, "--clinical", str(table), "--folds", "3", "--out", str(cli)]) == 0
    printed = capsys.readouterr().out.splitlines()
    evaluation = run_survival(url, CohortSettings([str(table)], folds=3), SurvivalSettings(), lib, config={})
    evaluation.write(lib)
    assert printed == [*evaluation.lines(), evaluation.wrote(cli)]
    _same_files(cli, lib, ("metrics.json", "predictions.csv", "km.png"))
    record = json.loads((lib / "metrics.json").read_text())
    assert "clinical_baseline_age_stage" in record and "provenance" in record
    assert evaluation.brief() == {"head": "coxnet", "summary": evaluation.result.summary,
                                  "logrank_p": evaluation.result.logrank_p}


def test_a_grade_result_writes_and_prints_what_the_command_does(cohort, tmp_path, capsys):
    url, table = cohort
    cli, lib = tmp_path / "cli", tmp_path / "lib"
    assert main(["grade", "--store", url, "--clinical", str(table), "--folds", "3", "--out", str(cli)]) == 0
    printed = capsys.readouterr().out.splitlines()
    evaluation = run_grade(url, CohortSettings([str(table)], folds=3), GradeSettings(), lib, config={})
    evaluation.write(lib)
    assert printed == [*evaluation.lines(), evaluation.wrote(cli)]
    _same_files(cli, lib, ("metrics.json", "predictions.csv", "confusion.png"))
    assert set(evaluation.brief()) == {"head", "summary", "classes", "confusion"}


def test_the_demos_heads_are_the_same_objects_without_the_baseline_or_provenance(cohort, tmp_path):
    url, table = cohort
    settings = CohortSettings([str(table)], folds=3)
    store, data = open_patients(url, settings)
    folds = settings.folds_of(data, "OS")
    evaluation = evaluate_survival(store, data, folds, SurvivalSettings(clinical_baseline=False), tmp_path)
    evaluation.plot(tmp_path)
    assert (tmp_path / "km.png").is_file() and not any("baseline" in line for line in evaluation.lines())
    assert "clinical_baseline_age_stage" not in evaluation.record() and "provenance" not in evaluation.record()
    drawn = evaluate_survival(store, data, folds, SurvivalSettings(heatmaps=("auto",)), tmp_path).heatmaps
    assert [d["method"] for d in drawn] == ["occlusion", "occlusion"]  # coxnet has no attention: tiles occluded
    assert not_estimated("coxnet", EvaluationError("too few events")) == {"head": "coxnet", "error": "too few events"}


def test_a_sweep_result_writes_the_three_files_and_logs_each_row(cohort, tmp_path):
    url, table = cohort
    logged: list[str] = []
    settings = SweepSettings([url], CohortSettings([str(table)], folds=3), tasks=("OS", "grade"), heads=("coxnet",),
                             grade_heads=("logreg",), poolings=("mean",))
    evaluation = evaluate_sweep(settings, tmp_path, config={}, log=logged.append)
    evaluation.write(tmp_path)
    evaluation.check(tmp_path)
    assert [line.split(":")[0] for line in logged] == ["  OS coxnet mean", "  grade logreg mean"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["rows"]) == 2 and sweep["encoder_modules_loaded"] == [] and "provenance" in sweep
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep_predictions.csv").is_file()
    assert evaluation.lines()[-2:] == [f"best {task}: {best}" for task, best in sweep["best"].items()]
    assert evaluation.wrote(tmp_path).startswith(f"wrote {tmp_path}/sweep.json") and evaluation.warnings() == []


def test_a_report_result_prints_as_the_command_and_writes_report_metrics(tmp_path, capsys):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": k, "text": v} for k, v in REFS.items()])
    assert main(["report", "--predictions", str(refs), "--references", str(refs), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.splitlines()
    logged: list[str] = []
    evaluation = run_report(ReportSettings(str(refs), str(refs)), {}, log=logged.append)
    assert logged == evaluation.lines()
    assert printed == [*logged, f"wrote {tmp_path / 'cli' / 'report_metrics.json'}"]
    path = evaluation.write(tmp_path / "lib")
    assert _without_provenance(path) == _without_provenance(tmp_path / "cli" / "report_metrics.json")
    quiet = evaluate_reports(ReportSettings(str(refs), str(refs)), log=lambda line: None)
    assert quiet.scores_record() == {k: v for k, v in _without_provenance(path).items()}
    with pytest.raises(EvaluationError, match="needs --store"):
        evaluate_reports(ReportSettings(str(refs), str(refs), checkpoint="run"))


def test_an_output_folder_that_is_a_file_is_refused_naming_the_flag(cohort, tmp_path):
    from tests.readme import run_main

    url, table = cohort
    (tmp_path / "afile").write_text("not a folder")
    for command, out in (("survival", "afile"), ("grade", "afile"), ("sweep", "afile/sweep"), ("split", "afile/s.csv")):
        result = run_main("evaluate", [command, "--store", url, "--clinical", str(table), "--out", out], tmp_path)
        assert result.code == 2 and f"--out {out}:" in result.stderr and "is an existing file" in result.stderr, \
            result.log
        assert "Traceback" not in result.log
