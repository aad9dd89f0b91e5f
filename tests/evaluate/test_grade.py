"""Grade heads from the cache: the planted grades are learned, missing grades are dropped, schemes kept apart."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate.abmil import TrainSettings, load_bags
from evaluate.features import patient_features
from evaluate.grade import cross_validate_grade, grade_labels
from slidecache.cohorts.clinical import PatientClinical, load_clinical
from slidecache.cohorts.splits import make_folds
from slidecache.errors import EvaluationError
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.evaluate.helpers import planted_cohort
from tests.readme import run_main

pytestmark = pytest.mark.xdist_group("test_grade")  # its module fixture is built once, on one worker


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("grade")
    url, table = planted_cohort(root, patients=150)
    return patient_features(EmbeddingStore.open(url), load_clinical(table)), url, table


def test_planted_grades_clearly_beat_chance(cohort):
    data, _, _ = cohort
    result = cross_validate_grade(data, make_folds(data.patient_ids, k=5, seed=0))
    assert result.classes == ["G1", "G2", "G3", "G4"] and result.scheme == "G1-G4"
    assert result.summary["qwk"]["mean"] > 0.6
    assert result.summary["balanced_accuracy"]["mean"] > 2 * result.summary["chance"]["balanced_accuracy"]
    assert result.summary["auc"]["mean"] > 0.8
    assert np.asarray(result.confusion).sum() == len(data)


def test_abmil_grade_head_beats_chance(cohort):
    data, url, _ = cohort
    bags = load_bags(EmbeddingStore.open(url), data.slides, max_tiles=32)
    result = cross_validate_grade(data, make_folds(data.patient_ids, k=5, seed=0), head="abmil", features=bags,
                                  settings=TrainSettings(epochs=30))
    assert result.head == "abmil" and set(result.models) == set(range(5))
    assert result.summary["qwk"]["mean"] > 0.6, result.summary
    assert result.summary["balanced_accuracy"]["mean"] > 2 * result.summary["chance"]["balanced_accuracy"]
    with pytest.raises(EvaluationError, match="trains on tiles"):
        cross_validate_grade(data, make_folds(data.patient_ids, k=5, seed=0), head="abmil")


def test_missing_and_mixed_schemes(cohort):
    data, _, _ = cohort
    data.clinical[0] = PatientClinical(data.patient_ids[0], grade=None)
    data.clinical[1] = PatientClinical(data.patient_ids[1], grade="High Grade", grade_scheme="high-low")
    mask, classes, scheme, dropped = grade_labels(data)
    assert scheme == "G1-G4" and not mask[0] and not mask[1]
    assert dropped == {"missing grade": 1, "other scheme": 1}
    lone = data.subset(np.arange(len(data)) < 2)
    lone.clinical = [PatientClinical("a", grade="G2", grade_scheme="G1-G4")] * 2
    with pytest.raises(EvaluationError, match="only one grade"):
        grade_labels(lone)


def test_grade_cli(cohort, tmp_path):
    _, url, table = cohort
    run = run_main("evaluate", ["grade", "--store", url, "--clinical", str(table), "--out", str(tmp_path / "g")],
                   REPO_ROOT)
    assert run.code == 0, run.stderr
    assert "qwk" in run.stdout and (tmp_path / "g" / "confusion.png").is_file()
