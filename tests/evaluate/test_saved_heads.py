"""Heads refit on every patient and saved without pickle: the saved affine map reproduces the fitted
pipeline on new inputs, the risk cut is the fitted patients' median, a forest is refused, and a head is
refused for a store of another fingerprint."""

from __future__ import annotations

import numpy as np
import pytest

from evaluate.features import patient_features
from evaluate.survival import refit_on_all
from slidecache.cohorts.clinical import load_clinical
from slidecache.errors import EvaluationError
from slidecache.heads.saved import affine_map, load_head
from store import EmbeddingStore
from tests.evaluate.helpers import planted_cohort
from tests.readme import run_main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return planted_cohort(tmp_path_factory.mktemp("heads"), patients=60)


def evaluate_cli(*args, cwd):
    return run_main("evaluate", args, cwd)


@pytest.mark.parametrize("head", ["coxnet", "coxph"])
def test_saved_survival_head_reproduces_the_refit_model(cohort, head, tmp_path):
    url, table = cohort
    run = evaluate_cli("survival", "--store", url, "--clinical", str(table), "--head", head, "--folds", "3",
                       "--out", "cv", "--save-head", "head", cwd=tmp_path)
    assert run.code == 0, run.stderr
    store = EmbeddingStore.open(url)
    saved = load_head(tmp_path / "head", store.fingerprint)
    data = patient_features(store, load_clinical(table))
    fitted, x = refit_on_all(data, "OS", head, seed=0)
    risks = fitted.risk(x)
    assert saved.card["risk_cut"] == pytest.approx(float(np.median(risks)))
    for i, patient in enumerate(data.patient_ids[:5]):  # one slide per patient: its pooled vector is the input
        prediction = saved.predict(store.slide(f"{patient}-S0"))
        assert prediction["risk"] == pytest.approx(risks[i], rel=1e-5, abs=1e-9)  # float32 in the fit
        assert prediction["risk_group"] == ("high" if risks[i] > saved.card["risk_cut"] else "low")


def test_saved_grade_head_gives_the_pipelines_probabilities(cohort, tmp_path):
    url, table = cohort
    run = evaluate_cli("grade", "--store", url, "--clinical", str(table), "--folds", "3", "--out", "cv",
                       "--save-head", "grade", cwd=tmp_path)
    assert run.code == 0, run.stderr
    saved = load_head(tmp_path / "grade")
    prediction = saved.predict(EmbeddingStore.open(url).slide("PT0000-S0"))
    assert set(prediction["probabilities"]) == set(saved.card["classes"])
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0)


def test_a_forest_and_a_foreign_store_are_refused(cohort, tmp_path):
    url, table = cohort
    run = evaluate_cli("survival", "--store", url, "--clinical", str(table), "--head", "rsf", "--out", "cv",
                       "--save-head", "head", cwd=tmp_path)
    assert run.code != 0 and "without pickle" in run.stderr
    evaluate_cli("grade", "--store", url, "--clinical", str(table), "--folds", "3", "--out", "cv",
                 "--save-head", "grade", cwd=tmp_path)
    with pytest.raises(EvaluationError, match="another encoder or tiling"):
        load_head(tmp_path / "grade", "0" * 64)


def test_affine_map_refuses_a_nonlinear_function():
    x = np.random.default_rng(0).normal(size=(20, 3))
    weight, bias = affine_map(lambda v: v @ np.array([[1.0], [2.0], [3.0]]) + 0.5, 3, x)
    assert np.allclose(weight[:, 0], [1, 2, 3]) and np.allclose(bias, [0.5])
    with pytest.raises(EvaluationError, match="not affine"):
        affine_map(lambda v: np.tanh(v).sum(1, keepdims=True), 3, x)
