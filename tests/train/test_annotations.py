"""Report annotations: with a split, the prognosis horizon comes from the training patients only, so the
held-out fold does not shape its own labels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evaluate.splits import write_split
from store import EmbeddingStore
from store.clinical import load_clinical
from tests.conftest import REPO_ROOT
from train.annotations import training_patients, write_annotations


@pytest.fixture
def table(tmp_path):
    # PT0003 is held out with a long follow-up: it would move the whole-cohort median from 200 to 250 days
    path = tmp_path / "clinical.csv"
    path.write_text("patient_id,grade,OS,OS.time\nPT0000,G1,1,100\nPT0001,G2,0,200\nPT0002,G3,1,300\nPT0003,G2,0,5000\n")
    return path


def test_horizon_from_training_patients_only(four_slides, table, tmp_path):
    store = EmbeddingStore.open(four_slides.store)
    clinical = load_clinical(table)
    everyone = write_annotations(store, clinical, tmp_path / "all.jsonl")
    assert everyone["risk_horizon_days"] == 250.0
    split = write_split(tmp_path / "split.csv", {"PT0000": 0, "PT0001": 0, "PT0002": 0, "PT0003": 1})
    trained = write_annotations(store, clinical, tmp_path / "train.jsonl", training_patients=training_patients(split, 1))
    assert trained["risk_horizon_days"] == 200.0 and trained["risk_horizon_from"] == "3 training patients"
    answers = {json.loads(line)["patient_id"]: json.loads(line)["conversations"][1]["value"]
               for line in (tmp_path / "train.jsonl").read_text().splitlines()}
    assert "high risk" in answers["PT0000"] and "low risk" in answers["PT0002"]  # 300 > 200: followed past it
    assert "Prognosis" not in answers["PT0001"]  # censored at the horizon, not past it

    run = subprocess.run([sys.executable, "-m", "train.annotations", "--store", four_slides.store, "--clinical",
                          str(table), "--split", str(split), "--fold", "1", "--out", str(tmp_path / "cli.jsonl")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "prognosis horizon 200 days, from 3 training patients" in run.stdout, run.stderr
