"""HistGen annotation JSONs as users have them (issue 27, item 4): empty reports refused as the CSV import
refuses them, ids with stray spaces, HistGen's own exact repeats kept once with a warning, conflicting
repeats refused naming the slide. Each through the command a user types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.evaluate.report_fixtures import HISTGEN_JSON, REPORTS_CSV, report_store
from tests.readme import Result, run_main


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return report_store(tmp_path_factory.mktemp("awkward_reports"))


def histgen() -> dict[str, list[dict[str, Any]]]:
    return json.loads(HISTGEN_JSON.read_text())


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def import_histgen(store_url: str, annotation: Path, cwd: Path, out: str = "out") -> Result:
    return run_main("train.import_reports", ["--store", store_url, "--histgen", str(annotation), "--out", out], cwd)


@pytest.mark.parametrize("empty", ["", "  \n "], ids=["empty", "blank"])
def test_an_empty_histgen_report_is_refused_as_the_csv_import_refuses_it(store_url, tmp_path, empty):
    data = histgen()
    slide = data["train"][4]["id"]
    data["train"][4]["report"] = empty
    run = import_histgen(store_url, write(tmp_path / "annotation.json", data), tmp_path)
    assert run.code == 2 and run.stdout == ""
    assert "annotation.json, train[4]: empty report" in run.stderr and slide in run.stderr
    assert "leave the entry out" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trains on an empty target

    rows = REPORTS_CSV.read_text().splitlines()  # the CSV path: the same refusal
    header, first = rows[0], rows[1]
    (tmp_path / "reports.csv").write_text(f"{header}\n{first.split(',')[0]},\"{empty}\"\n")
    csv_run = run_main("train.import_reports", ["--store", store_url, "--reports-csv", "reports.csv", "--out", "csv"],
                       tmp_path)
    assert csv_run.code == 2 and "reports.csv, line" in csv_run.stderr and ": empty text" in csv_run.stderr


def test_histgen_ids_lose_spaces_and_exact_repeats_are_kept_once_with_a_warning(store_url, tmp_path):
    data = histgen()
    padded = data["test"][2]["id"]
    data["test"][2]["id"] = f"  {padded} "
    repeated = dict(data["train"][3])
    data["train"].append(dict(repeated, id=f"{repeated['id']} "))  # HistGen's published list repeats entries
    run = import_histgen(store_url, write(tmp_path / "annotation.json", data), tmp_path)
    assert run.code == 0, run.stderr
    assert "wrote 40 annotations (train 28, val 3, test 9)" in run.stdout
    assert (f"warning: 1 repeated entries of {tmp_path / 'annotation.json'} left out (same slide, report and set), "
            f"e.g. {repeated['id']} at {tmp_path / 'annotation.json'}, train[28] repeats") in run.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
    slides = [r["slide"] for r in rows]
    assert len(slides) == len(set(slides)) == 40 and padded in slides

    conflicting = histgen()
    conflicting["val"].append(dict(conflicting["val"][0], report="Another report altogether."))
    run = import_histgen(store_url, write(tmp_path / "conflict.json", conflicting), tmp_path, "conflict")
    assert run.code == 2 and conflicting["val"][0]["id"] in run.stderr
    assert "conflict.json, val[3]" in run.stderr and "already has another report at" in run.stderr
    assert "val[0]" in run.stderr and not (tmp_path / "conflict").exists()

    two_sets = histgen()
    two_sets["test"].append(dict(two_sets["train"][0], split="test"))
    run = import_histgen(store_url, write(tmp_path / "two_sets.json", two_sets), tmp_path, "two_sets")
    assert run.code == 2 and two_sets["train"][0]["id"] in run.stderr and "is also in train" in run.stderr
