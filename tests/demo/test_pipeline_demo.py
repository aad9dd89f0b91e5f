"""The README's main command as a new user runs it: `python -m demo` with its defaults, in a fresh working
directory, no --out (the session fixture `readme_demo`). It extracts every slide, finds the planted signal
from the cache, writes well formed reports scored on held-out patients only, and a second run encodes and
trains nothing. When every slide fails, the run stops with one line naming the first errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from demo.cohort import DemoSize, nuclear_density, plan_patients
from demo.pipeline import _evaluation_inputs, _reusable_evaluation
from evaluate.report_metrics import parse_grade, parse_risk
from slidecache.cohorts.splits import read_split
from store import EmbeddingStore
from tests.conftest import REPO_ROOT


def test_planted_cohort_is_consistent():
    patients = plan_patients(DemoSize(patients=80))
    assert len(patients) == 80 and sum(len(p.slides) for p in patients) == 100
    by_grade = {g: [p.risk for p in patients if p.grade == g] for g in ("G1", "G2", "G3")}
    assert max(by_grade["G1"]) < min(by_grade["G2"]) and max(by_grade["G2"]) < min(by_grade["G3"])
    assert 0.2 < sum(not p.event for p in patients) / 80 < 0.8  # censoring present, events present
    assert nuclear_density(-2) < nuclear_density(0) < nuclear_density(2)


@pytest.mark.readme("make demo")
def test_make_demo_runs_python_m_demo_with_no_arguments():
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo: .*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe and recipe.group(1).strip() == "$(PY) -m demo"  # so the fixture's command is exactly what it runs


@pytest.mark.readme("python -m demo")
@pytest.mark.recipe("extract/virchow2-tiny.yaml")
def test_the_readme_demo_on_a_fresh_working_directory(readme_demo):
    assert readme_demo.returncode == 0, readme_demo.stderr[-3000:]
    out = readme_demo.out
    result = json.loads((out / "run_manifest.json").read_text())["summary"]
    assert (out / "summary.html").is_file() and result["summary_html"] == "demo_output/summary.html"
    assert result["failed"] == [] and result["verify_problems"] == []
    assert result["slides_in_store"] == result["extracted_now"] == 100  # every slide of the cohort
    store = EmbeddingStore.open(readme_demo.store)
    assert len(store.slide_ids()) == 100 and store.failures() == {}
    assert not (readme_demo.cwd / "cufile.log").exists() and not (out / "cufile.log").exists()
    survival = result["evaluation"]["survival"]["summary"]
    assert survival["harrell_c"]["mean"] >= 0.75, survival
    grade = result["evaluation"]["grade"]["summary"]
    assert grade["balanced_accuracy"]["mean"] > 1.5 * grade["chance"]["balanced_accuracy"], grade
    held_out = {p for p, fold in read_split(out / "splits.csv").items() if fold == 0}
    rows = [json.loads(line) for line in open(out / "reports_heldout.jsonl")]
    assert rows and all(r["id"].rsplit("-S", 1)[0] in held_out for r in rows)  # test patients only
    assert all(isinstance(r["text"], str) and r["reference"] for r in rows)
    assert all(parse_grade(r["reference"]) and parse_risk(r["reference"]) is not None or "Prognosis" not in r["reference"]
               for r in rows)
    reports = result["evaluation"]["reports"]
    assert reports["n"] == len(rows) and reports["clinical"]["stated_risk_unmatched"] == 0  # each report has its patient
    assert result["annotation_counts"]["risk_horizon_from"].endswith("training patients")  # the held-out fold excluded
    # the reporter reads the slide (issue 26): well-formed held-out reports that differ across patients, state the
    # grade the slide shows, and state another patient's grade when given that patient's slide
    texts = [r["text"] for r in rows]
    assert not any("\ufffd" in t for t in texts) and len(set(texts)) > 2, texts
    assert all(t.startswith("Invasive carcinoma, ") and t.endswith(" risk.") for t in texts), texts
    clinical = reports["clinical"]
    assert clinical["grade_stated_rate"] >= 0.95 and clinical["grade_qwk"] >= 0.8, clinical
    assert clinical["stated_risk_harrell_c"] >= 0.7, clinical  # 0.74 here; the Bayes ceiling on this fold ~0.84
    grounding = result["evaluation"]["grounding"]
    assert grounding["verdict"] == "follows the slide"
    assert grounding["scores"]["swapped"]["agrees_with_donor_grade"] >= 0.7
    html = (out / "summary.html").read_text()
    assert "The grounding check" in html and "follows the slide" in html
    assert "random weights" in html and "km.png" in html and "confusion.png" in html and "qc/slides/" in html
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["provenance"]["config"]["seed"] == 0 and "torch" in manifest["provenance"]["packages"]
    assert set(result["stage_seconds"]) == {"slides", "extraction", "training and generation", "evaluation"}


def test_a_second_run_encodes_and_trains_nothing(readme_demo, tmp_path):
    copy = tmp_path / "again"
    shutil.copytree(readme_demo.cwd, copy, ignore=shutil.ignore_patterns("*.lock"))
    rerun = subprocess.run([sys.executable, "-m", "demo"], cwd=copy, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "all 100 slides already in the store: nothing encoded" in rerun.stdout
    assert "already holds a finished run: reused" in rerun.stdout and "generated by this run's model: reused" in rerun.stdout
    assert "holds the metrics of these very inputs: reused" in rerun.stdout
    assert "Started a local Ray instance" not in rerun.stdout + rerun.stderr  # nothing to encode: no Ray
    assert json.loads((copy / "demo_output" / "evaluation" / "metrics.json").read_text())["survival"] == \
        json.loads((readme_demo.out / "evaluation" / "metrics.json").read_text())["survival"]
    # any changed input is evaluated again: here one patient moved to another fold
    out = copy / "demo_output"
    files = [out / "splits.csv", out / "clinical.csv", out / "annotations.jsonl", out / "reports_heldout.jsonl"]
    before = _evaluation_inputs(out, *files)
    rows = (out / "splits.csv").read_text().splitlines()
    rows[1] = rows[1][:-1] + str((int(rows[1][-1]) + 1) % 5)
    (out / "splits.csv").write_text("\n".join(rows) + "\n")
    assert _evaluation_inputs(out, *files) != before and _reusable_evaluation(out / "evaluation", _evaluation_inputs(out, *files)) is None
    second = json.loads((copy / "demo_output" / "run_manifest.json").read_text())["summary"]
    assert second["extracted_now"] == 0 and second["skipped_complete"] == 100


def test_when_every_slide_fails_the_demo_stops_with_one_line_naming_the_errors(tmp_path):
    slides = tmp_path / "demo_output" / "slides"
    slides.mkdir(parents=True)
    for patient in plan_patients(DemoSize(patients=3)):
        for slide_id in patient.slides:
            (slides / f"{slide_id}.tiff").write_bytes(b"not a slide at all")  # existing files are kept
    run = subprocess.run([sys.executable, "-m", "demo", "--patients", "3"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    (line,) = [row for row in run.stderr.splitlines() if row.startswith("error:")]
    assert "all 3 slides" in line and "failed to extract" in line and "DEMO-P000-S0: SlideReadError" in line
    assert "python -m store failures" in line
