"""The README's main command on a smaller cohort: the planted signal is found from the cache, reports are
well formed and scored on held-out patients only, and a second run extracts and trains nothing."""

import json

from demo.cohort import DemoSize, nuclear_density, plan_patients
from demo.pipeline import DemoSettings, run
from evaluate.report_metrics import parse_grade, parse_risk
from evaluate.splits import read_split


def test_planted_cohort_is_consistent():
    patients = plan_patients(DemoSize(patients=80))
    assert len(patients) == 80 and sum(len(p.slides) for p in patients) == 100
    by_grade = {g: [p.risk for p in patients if p.grade == g] for g in ("G1", "G2", "G3")}
    assert max(by_grade["G1"]) < min(by_grade["G2"]) and max(by_grade["G2"]) < min(by_grade["G3"])
    assert 0.2 < sum(not p.event for p in patients) / 80 < 0.8  # censoring present, events present
    assert nuclear_density(-2) < nuclear_density(0) < nuclear_density(2)


def test_demo_end_to_end_and_second_run_reuses_everything(tmp_path):
    settings = DemoSettings(size=DemoSize(patients=40, min_side=900, max_side=1300), train_epochs=4, max_tiles=16)
    first = run(tmp_path, settings, log=lambda m: None)
    assert first["failed"] == [] and first["verify_problems"] == [] and first["extracted_now"] == first["slides_in_store"]
    survival = first["evaluation"]["survival"]["summary"]
    assert survival["harrell_c"]["mean"] >= 0.75, survival
    grade = first["evaluation"]["grade"]["summary"]
    assert grade["balanced_accuracy"]["mean"] > 1.5 * grade["chance"]["balanced_accuracy"], grade
    held_out = {p for p, fold in read_split(first["split"]).items() if fold == 0}
    rows = [json.loads(line) for line in open(first["generated"])]
    assert rows and all(r["id"].rsplit("-S", 1)[0] in held_out for r in rows)  # test patients only
    assert all(isinstance(r["text"], str) and r["reference"] for r in rows)
    assert all(parse_grade(r["reference"]) and parse_risk(r["reference"]) is not None or "Prognosis" not in r["reference"]
               for r in rows)
    reports = first["evaluation"]["reports"]
    assert reports["n"] == len(rows) and reports["clinical"]["stated_risk_unmatched"] == 0  # each report has its patient
    html = (tmp_path / "summary.html").read_text()
    assert "random weights" in html and "km.png" in html and "confusion.png" in html and "qc/slides/" in html
    second = run(tmp_path, settings, log=lambda m: None)
    assert second["extracted_now"] == 0 and second["skipped_complete"] == first["slides_in_store"]
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    assert manifest["provenance"]["config"]["seed"] == 0 and "torch" in manifest["provenance"]["packages"]
