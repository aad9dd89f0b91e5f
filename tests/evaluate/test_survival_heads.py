"""Survival heads from the cache: planted signal found, permuted labels at chance, folds by patient."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from evaluate.features import patient_features
from evaluate.survival import cross_validate
from slidecache.cohorts.clinical import Outcome, PatientClinical, load_clinical
from slidecache.cohorts.splits import make_folds, read_split, write_split
from slidecache.errors import EvaluationError
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.evaluate.helpers import planted_cohort

pytestmark = pytest.mark.xdist_group("test_survival_heads")  # its module fixture is built once, on one worker


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    url, table = planted_cohort(root, patients=150, slides_per_patient=2)
    return patient_features(EmbeddingStore.open(url), load_clinical(table)), url, table


def folds_for(data, k=5, seed=0):
    has, _, events = data.endpoint("OS")
    return make_folds(data.patient_ids, events, k, seed)


@pytest.mark.parametrize("head", ["coxnet", "coxph", "rsf"])
def test_planted_signal_is_recovered(planted, head):
    data, _, _ = planted
    result = cross_validate(data, "OS", head, folds_for(data))
    assert result.summary["harrell_c"]["mean"] >= 0.8, result.summary
    assert result.summary["uno_c"]["mean"] >= 0.75
    assert 0.0 < result.summary["ibs"]["mean"] < 0.25
    assert result.logrank_p is not None and result.logrank_p < 1e-3
    for fold in result.folds:
        lo, hi = fold["harrell_c_ci95"]
        assert lo <= fold["harrell_c"] <= hi
    assert len(result.predictions) == len(data) and len({p["patient_id"] for p in result.predictions}) == len(data)


def test_permuted_labels_are_at_chance(tmp_path):
    url, table = planted_cohort(tmp_path, patients=150, permute=True)
    data = patient_features(EmbeddingStore.open(url), load_clinical(table))
    result = cross_validate(data, "OS", "coxph", folds_for(data))
    assert abs(result.summary["harrell_c"]["mean"] - 0.5) <= 0.07


def test_patients_pooled_and_folds_disjoint(planted):
    data, _, _ = planted
    assert all(len(s) == 2 for s in data.slides)  # two slides per patient, one sample
    folds = folds_for(data)
    assert set(folds) == set(data.patient_ids)  # every patient in exactly one fold (a dict cannot hold two)
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1


def test_same_seed_same_metrics(planted):
    data, _, _ = planted
    a = cross_validate(data, "OS", "coxnet", folds_for(data, seed=3), seed=3)
    b = cross_validate(data, "OS", "coxnet", folds_for(data, seed=3), seed=3)
    assert a.summary == b.summary


def test_split_file_round_trip(planted, tmp_path):
    data, _, _ = planted
    folds = folds_for(data)
    assert read_split(write_split(tmp_path / "split.csv", folds)) == folds
    (tmp_path / "bad.csv").write_text("patient_id,fold\nP1,x\n")
    with pytest.raises(EvaluationError, match="row 2: fold 'x'"):
        read_split(tmp_path / "bad.csv")


def test_site_preserving_folds():
    ids = [f"TCGA-{site}-{i:04d}" for site in ("AA", "BB", "CC", "DD", "EE", "FF") for i in range(10)]
    sites = [i[5:7] for i in ids]
    events = [i % 3 == 0 for i in range(len(ids))]
    folds = make_folds(ids, events, 3, 0, sites)
    for site in set(sites):
        assert len({folds[i] for i, s in zip(ids, sites) if s == site}) == 1


def test_bad_inputs(planted, tmp_path):
    data, url, _ = planted
    with pytest.raises(EvaluationError, match="unknown endpoint 'XYZ'"):
        data.endpoint("XYZ")
    with pytest.raises(EvaluationError, match="unknown survival head"):
        cross_validate(data, "OS", "deepsurv", folds_for(data))
    has, times, events = data.endpoint("OS")
    folds = folds_for(data)
    censored_fold = {p: (0 if not e else 1) for p, e in zip(data.patient_ids, events)}
    with pytest.raises(EvaluationError, match="the training part of fold 1 has no OS event"):
        cross_validate(data, "OS", "coxph", censored_fold)
    # a held-out fold without an event is scored null with its reason; the other folds still count
    no_event_test = dict(folds)
    censored = [p for p, e in zip(data.patient_ids, events) if not e]
    no_event_test.update({p: 5 for p in censored[:6]})
    result = cross_validate(data, "OS", "coxph", no_event_test)
    fold5 = next(m for m in result.folds if m["fold"] == 5)
    assert fold5["harrell_c"] is None and "all censored" in fold5["not_computed"]["harrell_c"]
    assert result.summary["harrell_c"]["folds"] == 5 and "5" in result.summary["harrell_c"]["not_computed_in_folds"]
    tiny = {p: i % 2 for i, p in enumerate(data.patient_ids[:8])}  # 4 training patients per fold
    with pytest.raises(EvaluationError, match="training part of fold 0 has 4 patients.*use fewer folds or more patients"):
        cross_validate(data, "OS", "coxnet", tiny)
    (tmp_path / "censored.csv").write_text("patient_id,OS,OS.time\n" + "".join(f"{p},0,100\n" for p in data.patient_ids))
    all_censored = patient_features(EmbeddingStore.open(url), load_clinical(tmp_path / "censored.csv"))
    with pytest.raises(EvaluationError, match="all 150 patients are censored"):
        cross_validate(all_censored, "OS", "coxph", folds)
    (tmp_path / "other.csv").write_text("patient_id,OS,OS.time\nSOMEONE,1,100\n")
    with pytest.raises(EvaluationError, match="shares no patient with the store"):
        patient_features(EmbeddingStore.open(url), load_clinical(tmp_path / "other.csv"))
    (tmp_path / "nan.csv").write_text("patient_id,OS,OS.time\nPT0000,1,nan\nPT0001,1,inf\n")
    with pytest.raises(Exception, match=r"row 3, column 'OS.time': 'inf' is not a finite number"):
        load_clinical(tmp_path / "nan.csv")  # "nan" is a missing marker (that patient has no OS); inf is an error
    nan_data = patient_features(EmbeddingStore.open(url), load_clinical(tmp_path / "censored.csv"))
    nan_data.clinical[0] = PatientClinical("PT0000", endpoints={"OS": Outcome(float("nan"), True)})
    with pytest.raises(EvaluationError, match="NaN"):
        cross_validate(nan_data, "OS", "coxph", folds)


def test_cli_split_and_survival_never_import_the_encoder(planted, tmp_path):
    _, url, table = planted
    split = subprocess.run([sys.executable, "-m", "evaluate", "split", "--store", url, "--clinical", str(table),
                            "--out", str(tmp_path / "split.csv")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr
    code = ("import sys, runpy; sys.argv = ['evaluate', 'survival', '--store', %r, '--clinical', %r, '--split', %r, "
            "'--head', 'coxnet', '--out', %r]\ntry:\n    runpy.run_module('evaluate', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nbad = [m for m in sys.modules if m.split('.')[0] in ('extract', 'timm', 'ray')]\n"
            "assert not bad, bad\nprint('no encoder imported')") % (url, str(table), str(tmp_path / "split.csv"), str(tmp_path / "out"))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no encoder imported" in run.stdout and "re-encoded nothing" in run.stdout
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["summary"]["harrell_c"]["mean"] >= 0.8 and report["re_encoded_tiles"] == 0
    assert "clinical_baseline_age_stage" in report and report["provenance"]["config"]["head"] == "coxnet"
    assert (tmp_path / "out" / "km.png").stat().st_size > 1000
