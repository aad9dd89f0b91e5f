"""Report annotations: with a split, the prognosis horizons come from the training patients only, so the
held-out fold does not shape its own labels; three ordered prognosis groups by default, two on request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slidecache.cohorts.clinical import load_clinical
from slidecache.cohorts.splits import write_split
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from train.annotations import risk_groups, training_patients, write_annotations


@pytest.fixture
def table(tmp_path):
    # PT0003 is held out with a long follow-up: it would move the whole-cohort median from 200 to 250 days
    path = tmp_path / "clinical.csv"
    path.write_text("patient_id,grade,OS,OS.time\nPT0000,G1,1,100\nPT0001,G2,0,200\nPT0002,G3,1,300\nPT0003,G2,0,5000\n")
    return path


def test_horizon_from_training_patients_only(four_slides, table, tmp_path):
    store = EmbeddingStore.open(four_slides.store)
    clinical = load_clinical(table)
    everyone = write_annotations(store, clinical, tmp_path / "all.jsonl", levels=2)
    assert everyone["risk_horizons_days"] == [250.0]
    split = write_split(tmp_path / "split.csv", {"PT0000": 0, "PT0001": 0, "PT0002": 0, "PT0003": 1})
    trained = write_annotations(store, clinical, tmp_path / "train.jsonl",
                                training_patients=training_patients(split, 1), levels=2)
    assert trained["risk_horizons_days"] == [200.0] and trained["risk_horizon_from"] == "3 training patients"
    answers = {json.loads(line)["patient_id"]: json.loads(line)["conversations"][1]["value"]
               for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    assert "high risk" in answers["PT0000"] and "low risk" in answers["PT0002"]  # 300 > 200: followed past it
    assert "Prognosis" not in answers["PT0001"]  # censored at the horizon, not past it

    run = subprocess.run([sys.executable, "-m", "train.annotations", "--store", four_slides.store, "--clinical",
                          str(table), "--split", str(split), "--fold", "1", "--risk-groups", "2",
                          "--out", str(tmp_path / "cli.jsonl")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "2 prognosis groups, horizon 200 days, from 3 training patients" in run.stdout, \
        run.stderr
    assert "slides per stated prognosis: high 1, low 2, none 1" in run.stdout, run.stdout


def test_three_prognosis_groups_at_the_event_time_tertiles(tmp_path):
    # event times 100, 300, 400, 600, 700, 900 days: tertile horizons 366.7 and 633.3 (censored times do not count)
    rows = ["patient_id,OS,OS.time"] + [f"P{i},{event},{time}" for i, (event, time) in enumerate(
        [(1, 100), (1, 300), (0, 200), (1, 400), (1, 600), (0, 500), (1, 700), (0, 800), (1, 900)])]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    groups, horizons = risk_groups(load_clinical(tmp_path / "t.csv"), "OS")
    assert [round(h, 1) for h in horizons] == [366.7, 633.3]
    assert groups == {"P0": "high", "P1": "high",  # events by the first horizon
                      "P3": "intermediate", "P4": "intermediate",  # events between the two
                      "P6": "low", "P7": "low", "P8": "low"}  # followed past the second (an event after it or none)
    # P2 and P5 were censored before the second horizon: their group is unknown, nothing is stated
    with pytest.raises(Exception, match="choose 2"):
        risk_groups(load_clinical(tmp_path / "t.csv"), "OS", levels=4)
    (tmp_path / "none.csv").write_text("patient_id,OS,OS.time\nP0,0,100\nP1,0,200\n")
    with pytest.raises(Exception, match="no OS event"):
        risk_groups(load_clinical(tmp_path / "none.csv"), "OS")
    assert risk_groups(load_clinical(tmp_path / "none.csv"), "OS", levels=2)[1] == [150.0]
