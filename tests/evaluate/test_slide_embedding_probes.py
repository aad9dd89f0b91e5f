"""Linear and Cox probes on a store's slide-embedding set (`--slide-embeddings NAME`): the cohort's tiles are noise
and its set, written through the store API as `extract slide-embeddings` writes one, carries a known linear risk
direction, so the set's rows find the signal and the pooled rows do not. Checked: held-out C and QWK on the planted
set, chance on permuted outcomes, a patient's slides averaged, the slides a set lacks counted with the command that
makes them, `--pooling` and tile heads refused beside a set, and a sweep with set rows on the pooled rows' patients
and folds, with the set's paired C difference to the pooled tiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from evaluate.cohort import CohortSettings
from evaluate.grade_eval import GradeSettings, run_grade
from evaluate.survival_eval import SurvivalSettings, run_survival
from store import EmbeddingStore
from tests.readme import run_in_process, run_main, to_argv
from tests.store.helpers import spec, write_slide

SURVIVAL = ("python -m evaluate survival --store STORE --clinical TABLE --slide-embeddings NAME [--head coxnet|coxph] "
            "[--endpoint OS|DSS|DFI|PFI] [--split splits.csv] --out DIR")
GRADE = "python -m evaluate grade --store STORE --clinical TABLE --slide-embeddings NAME [--head logreg] --out DIR"
SWEEP = ("python -m evaluate sweep --store STORE --clinical TABLE --tasks OS grade --heads coxnet coxph "
         "--grade-heads logreg --poolings mean --slide-embeddings NAME [NAME ...] --out DIR")
# docs/heads.md: tile stores x aggregators (mean, each MIL head, a slide-embedding set), one reference row
EVERY_AGGREGATOR = ("python -m evaluate sweep --store STORE_A STORE_B --clinical TABLE --tasks OS grade "
                    "--heads coxnet abmil-cox transmil-cox clam-sb-cox dsmil-cox --grade-heads logreg abmil transmil "
                    "clam-sb dsmil --poolings mean --slide-embeddings NAME --reference coxnet/mean --out DIR")
SET = "titan-random"  # the set `extract slide-embeddings --slide-encoder titan-random` makes
PARTIAL = "titan-partial"  # the same vectors, some slides never made, one failed
SET_DIM = 16
TILE_DIM = 8


def slide_set_cohort(root: Path, patients: int = 120, seed: int = 0, signal: float = 2.5, noise: float = 0.15,
                     permute: bool = False, partial_set: bool = True) -> tuple[str, Path, list[str]]:
    """A store whose tiles are noise, every third patient with two slides, and sets SET (every slide) and PARTIAL
    (slides of patients 0 and 3 missing: patient 0 has two, so it is averaged over none and left out; of patient 3's
    two, one is missing and one failed there too); slide vectors are risk * direction + noise. Survival follows
    exp(signal * risk) hazards, grade the risk's quartile-ish bands (as tests/evaluate/helpers.planted_cohort)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=SET_DIM)
    direction /= np.linalg.norm(direction)
    risk = rng.normal(size=patients)
    url = str(root / "store.zarr")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(dim=TILE_DIM))
    slide_ids = []
    for p in range(patients):
        for s in range(2 if p % 3 == 0 else 1):
            write_slide(store, f"PT{p:04d}-S{s}", 4, seed=seed * 10_000 + p * 2 + s, patient_id=f"PT{p:04d}")
            slide_ids.append(f"PT{p:04d}-S{s}")
    store = EmbeddingStore.open(url, mode="a")
    set_spec = {"slide_encoder": {"name": SET, "weights_id": "random-init:seed=0", "dim": SET_DIM,
                                  "compute_precision": "fp32"}, "tiles": store.fingerprint}
    full = store.slide_embedding_set(SET, spec=set_spec)
    partial = store.slide_embedding_set(PARTIAL, spec=set_spec) if partial_set else None
    lacking = {"PT0000-S0", "PT0000-S1", "PT0003-S1"}
    for slide_id in slide_ids:
        vector = risk[int(slide_id[2:6])] * direction + noise * rng.normal(size=SET_DIM)
        commit = store.slide(slide_id).commit_id
        full.write(slide_id, vector, tile_commit=commit, n_tiles=4)
        if partial is not None and slide_id not in lacking:
            partial.write(slide_id, vector, tile_commit=commit, n_tiles=4)
    if partial is not None:
        partial.record_failure("PT0003-S1", RuntimeError("tiles the model refused"), store.slide("PT0003-S1").commit_id)
    hazard = 0.001 * np.exp(signal * risk)
    event_time = rng.exponential(1 / hazard)
    censor_time = rng.uniform(200, 3000, patients)
    time, event = np.minimum(event_time, censor_time).round(1), (event_time <= censor_time).astype(int)
    grades = np.digitize(risk, [-0.7, 0.0, 0.7]) + 1
    if permute:  # the outcomes of other patients: nothing in the vectors can predict them
        time, event, grades = time[(order := rng.permutation(patients))], event[order], grades[order]
    stages = ["Stage I", "Stage II", "Stage III", "Stage IV"]
    rows = ["patient_id,cancer_type,grade,age,stage,OS,OS.time"]
    rows += [f"PT{p:04d},DEMO,G{grades[p]},{50 + p % 30},{stages[grades[p] - 1]},{event[p]},{time[p]}"
             for p in range(patients)]
    table = root / "clinical.csv"
    table.write_text("\n".join(rows) + "\n")
    return url, table, slide_ids


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[str, Path, list[str]]:
    return slide_set_cohort(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def permuted(tmp_path_factory) -> tuple[str, Path, list[str]]:
    return slide_set_cohort(tmp_path_factory.mktemp("permuted"), seed=3, permute=True, partial_set=False)


def values(cohort, name: str = SET) -> dict[str, str]:
    return {"STORE": cohort[0], "TABLE": str(cohort[1]), "NAME": name, "DIR": "out"}


def run(command: str, cwd: Path, **filled: str):
    result = run_in_process(to_argv(command, filled), cwd)
    assert result.code == 0 and "Traceback" not in result.log, result.log[-3000:]
    return result


@pytest.mark.readme(SURVIVAL)
def test_cox_probe_on_the_set_finds_the_planted_risk(planted, tmp_path):
    result = run(SURVIVAL, tmp_path, **values(planted))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    fingerprint = EmbeddingStore.open(planted[0]).slide_embedding_set(SET).fingerprint
    assert metrics["summary"]["harrell_c"]["mean"] >= 0.75, metrics["summary"]
    assert metrics["pooling"] == f"set:{SET}" and metrics["patients"] == 120
    assert metrics["slide_embeddings"]["name"] == SET and metrics["slide_embeddings"]["fingerprint"] == fingerprint
    assert metrics["slide_embeddings"]["slides_missing"] == 0 and metrics["provenance"]
    assert f"set {SET!r} ({SET}, fingerprint {fingerprint[:12]}), 160 of 160 slides" in result.stdout
    assert "slide embeddings of set" in result.stdout and "warning" not in result.log


@pytest.mark.readme(GRADE)
def test_logistic_probe_on_the_set_grades(planted, tmp_path):
    run(GRADE, tmp_path, **values(planted))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["summary"]["qwk"]["mean"] >= 0.8, metrics["summary"]
    assert metrics["pooling"] == f"set:{SET}" and metrics["slide_embeddings"]["name"] == SET


def test_a_patients_slides_are_averaged_as_the_pooled_path_does(planted, tmp_path):
    from evaluate.features import set_features
    from slidecache.cohorts.clinical import load_clinical_tables

    store = EmbeddingStore.open(planted[0])
    data, coverage = set_features(store, load_clinical_tables([str(planted[1])]), SET)
    i = data.patient_ids.index("PT0003")
    assert data.slides[i] == ["PT0003-S0", "PT0003-S1"]
    ids, vectors = store.slide_embeddings(SET)
    np.testing.assert_allclose(data.features[i], vectors[[ids.index(s) for s in data.slides[i]]].mean(axis=0),
                               rtol=1e-6)
    assert coverage.slides == 160 and not coverage.missing


def test_permuted_outcomes_score_chance(permuted, tmp_path):
    cohort = CohortSettings([str(permuted[1])])
    survival = run_survival(permuted[0], cohort, SurvivalSettings(slide_embeddings=SET), tmp_path / "os", log=print)
    grade = run_grade(permuted[0], cohort, GradeSettings(slide_embeddings=SET), tmp_path / "grade", log=print)
    c, qwk = survival.result.summary["harrell_c"]["mean"], grade.result.summary["qwk"]["mean"]
    print(f"permuted: harrell_c {c:.3f}, qwk {qwk:.3f}")
    assert abs(c - 0.5) <= 0.08 and abs(qwk) <= 0.15


def test_slides_missing_from_the_set_are_counted_with_the_command_that_makes_them(planted, tmp_path):
    result = run(SURVIVAL, tmp_path, **values(planted, PARTIAL))
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())["slide_embeddings"]
    assert record["slides_missing"] == 3 and record["slides_failed"] == 1 and record["patients_left_out"] == 1
    assert record["patients_partial"] == 1 and record["missing_slide_ids"] == ["PT0000-S0", "PT0000-S1", "PT0003-S1"]
    command = f"python -m extract slide-embeddings --store {planted[0]} --slide-encoder {SET} --set {PARTIAL}"
    assert record["make_missing"] == command
    assert (f"no embedding of 3 of the 160 slides (1 failed there), e.g. PT0000-S0, PT0000-S1, PT0003-S1: 1 patients "
            f"left out, 1 averaged over their other slides; make them with `{command} --retry-failed`") in result.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["patients"] == 119


def test_pooling_tile_heads_and_unknown_sets_are_refused_beside_a_set(planted, tmp_path):
    store, table = planted[0], str(planted[1])
    base = ["--store", store, "--clinical", table, "--out", "out"]
    refused = {
        "--pooling max pools a slide's tiles, but --slide-embeddings titan-random reads the slide vectors":
            ["survival", *base, "--slide-embeddings", SET, "--pooling", "max"],
        "--pooling mean pools a slide's tiles":
            ["grade", *base, "--slide-embeddings", SET, "--pooling", "mean"],
        "--head abmil-cox trains on the tiles, not on slide vectors":
            ["survival", *base, "--slide-embeddings", SET, "--head", "abmil-cox"],
        "--head abmil trains on the tiles": ["grade", *base, "--slide-embeddings", SET, "--head", "abmil"],
        "--save-head saves a head applied to a new slide's pooled tiles":
            ["survival", *base, "--slide-embeddings", SET, "--save-head", "head"],
        f"no slide-embedding set 'prism' in {store} (sets: {PARTIAL}, {SET}); make it with `python -m extract "
        "slide-embeddings": ["survival", *base, "--slide-embeddings", "prism"],
    }
    for message, args in refused.items():
        result = run_main("evaluate", args, tmp_path)
        assert result.code == 2 and message in result.stderr and "Traceback" not in result.log, (args, result.log)
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.readme(SWEEP)
def test_sweep_rows_for_the_set_beside_the_pooled_rows(planted, tmp_path):
    result = run(SWEEP, tmp_path, **values(planted))
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    rows = {(r["task"], r["head"], r["pooling"]): r for r in sweep["rows"]}
    label = f"set:{SET}"
    assert set(rows) == {(task, head, pooling) for pooling in ("mean", label)
                         for task, head in (("OS", "coxnet"), ("OS", "coxph"), ("grade", "logreg"))}
    assert not any(r["error"] for r in sweep["rows"]) and {r["patients"] for r in sweep["rows"]} == {120}
    for head in ("coxnet", "coxph"):
        on_set, pooled = rows[("OS", head, label)], rows[("OS", head, "mean")]
        assert on_set["harrell_c_mean"] >= 0.75 and abs(pooled["harrell_c_mean"] - 0.5) <= 0.1, (on_set, pooled)
        assert on_set["harrell_c_ci95_low"] < on_set["harrell_c_mean"] < on_set["harrell_c_ci95_high"]
    assert rows[("grade", "logreg", label)]["qwk_mean"] >= 0.8
    differences = {(d["head"], d["a"], d["b"]): d for d in sweep["paired_differences"]}
    assert set(differences) == {("coxnet", "mean", label), ("coxph", "mean", label)}
    assert all(d["difference"] > 0.2 and d["ci95"][0] > 0 and d["patients"] == 120 for d in differences.values())
    assert sweep["slide_embeddings"][SET]["fingerprint"] == EmbeddingStore.open(planted[0]).slide_embedding_set(
        SET).fingerprint
    with open(tmp_path / "out" / "sweep_predictions.csv") as f:  # the same patients in the same folds
        folds: dict[str, dict[str, str]] = {}
        for row in csv.DictReader(f):
            folds.setdefault(row["pooling"] + row["head"], {})[row["patient_id"]] = row["fold"]
    assert folds[f"{label}coxnet"] == folds["meancoxnet"] and len(folds["meancoxnet"]) == 120
    assert f"OS     coxnet       {label}" in result.stdout and "set:titan-random vs mean" in result.stdout


@pytest.mark.slow
@pytest.mark.readme(EVERY_AGGREGATOR)
def test_a_sweep_of_every_aggregator_over_two_stores_against_one_reference(planted, permuted, tmp_path):
    """Store A's set carries the outcome, its tiles and all of store B do not (B's vectors follow other patients'
    risks): only A's set rows beat the reference (A's pooled coxnet) with intervals above 0; every row has its
    intervals, and the HTML table and forest plot name every row."""
    result = run(EVERY_AGGREGATOR, tmp_path, STORE_A=planted[0], STORE_B=permuted[0], TABLE=str(planted[1]), NAME=SET,
                 DIR="out")
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    rows = {(r["encoder"], r["task"], r["head"], r["pooling"]): r for r in sweep["rows"]}
    encoders = sorted({r["encoder"] for r in sweep["rows"]})
    assert len(encoders) == 2 and not any(r["error"] for r in sweep["rows"]), result.log[-3000:]
    survival = {("coxnet", "mean"), ("coxnet", f"set:{SET}"), *((h, "tiles") for h in
                ("abmil-cox", "transmil-cox", "clam-sb-cox", "dsmil-cox"))}
    grade = {("logreg", "mean"), ("logreg", f"set:{SET}"), *((h, "tiles") for h in ("abmil", "transmil", "clam-sb",
                                                                                        "dsmil"))}
    assert set(rows) == {(e, "OS", h, p) for e in encoders for h, p in survival} | {
        (e, "grade", h, p) for e in encoders for h, p in grade}
    a, b = encoders if rows[(encoders[0], "OS", "coxnet", f"set:{SET}")]["harrell_c_mean"] > 0.75 else encoders[::-1]
    reference = rows[(a, "OS", "coxnet", "mean")]
    assert reference["reference"] and not reference.get("harrell_c_diff")  # the reference is not compared with itself
    assert sweep["reference_rows"]["OS"] == f"{a}/OS/coxnet/mean"
    on_set = rows[(a, "OS", "coxnet", f"set:{SET}")]
    assert on_set["harrell_c_diff"] > 0.2 and on_set["harrell_c_diff_ci95_low"] > 0
    assert on_set["uno_c_ci95_low"] < on_set["uno_c_mean"] < on_set["uno_c_ci95_high"]
    assert rows[(a, "grade", "logreg", f"set:{SET}")]["qwk_diff_ci95_low"] > 0
    for key, row in rows.items():  # nothing else carries the outcome: no interval of C clear of 0.5 upwards
        if key[1] == "OS" and row is not on_set:
            assert row["harrell_c_ci95_low"] < 0.62, (key, row)
    html = (tmp_path / "out" / "sweep.html").read_text()
    assert 'src="sweep_forest.png"' in html and (tmp_path / "out" / "sweep_forest.png").read_bytes()[:4] == b"\x89PNG"
    assert all(head in html for _, _, head, _ in rows) and f"set:{SET}" in html
