"""The reporter reads the slide (issue 26), tested by what it must do, never by its loss: on a planted cohort
whose tiles carry a huge shared channel and constant dimensions, as real encoders' do, a reporter trained
with tiny.yaml's own settings states the held-out patients' grades, and states the donor's grade when
given another patient's slide; a reporter given constant tiles is called image-blind by the same check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from evaluate.grounding import FOLLOWS_DONOR, choose_donors, grounding_check, grounding_scores, verdict_of
from evaluate.report_metrics import clinical_correctness
from slidecache.cohorts.clinical import load_clinical
from slidecache.cohorts.splits import write_split
from store import EmbeddingStore
from tests.evaluate.helpers import planted_cohort
from train.annotations import training_patients, write_annotations, write_meta
from train.config import parse_args
from train.generation import generate_reports
from train.run import train

pytestmark = pytest.mark.xdist_group("test_grounding")  # the module fixtures train twice: build them once
PATIENTS, HELD_OUT = 60, 0
RISK_LEVELS = (-1.4, -0.35, 0.35, 1.4)  # one per grade (cuts at -0.7, 0, 0.7), 0.25 or more from every cut


@dataclass
class Reporter:
    store: str
    run: Path
    annotations: Path
    generated: Path
    rows: list[dict]


def trained_reporter(root: Path, *extra: str, **cohort) -> Reporter:
    url, table = planted_cohort(root, patients=PATIENTS, seed=1, noise=0.3, risk_levels=RISK_LEVELS, **cohort)
    split = write_split(root / "split.csv", {f"PT{p:04d}": p % 5 for p in range(PATIENTS)})
    annotations = root / "annotations.jsonl"
    write_annotations(EmbeddingStore.open(url), load_clinical(table), annotations,
                      training_patients=training_patients(split, HELD_OUT))
    meta = write_meta(root / "meta.json", annotations)
    run = root / "run"
    train(*parse_args(["--config", "tiny.yaml", "--meta_path", str(meta), "--store", url, "--output_dir", str(run),
                       "--split", str(split), "--fold", str(HELD_OUT), "--report_to", "none", "--save_strategy", "no",
                       "--disable_tqdm", "True", *extra]))
    generated = root / "gen.jsonl"
    generate_reports(str(run), url, str(meta), generated, str(split), HELD_OUT, max_new_tokens=24)
    return Reporter(url, run, annotations, generated, [json.loads(line) for line in generated.read_text().splitlines()])


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Reporter:
    """tiny.yaml at its own settings, on tiles with a channel of 200 shared by all and 8 constant dimensions."""
    return trained_reporter(tmp_path_factory.mktemp("reads"), shared_offset=200.0, constant_dims=8)


@pytest.mark.recipe("tiny.yaml")
def test_held_out_reports_state_the_grade_the_slide_shows(reader):
    assert len(reader.rows) == PATIENTS // 5  # the held-out fold only, one slide each
    predictions = {r["id"]: r["text"] for r in reader.rows}
    correctness = clinical_correctness(predictions, {r["id"]: [r["reference"]] for r in reader.rows})
    assert correctness["grade_stated_rate"] >= 0.95, reader.rows
    assert correctness["grade_accuracy"] >= 0.8 and correctness["grade_qwk"] >= 0.8, (correctness, reader.rows)
    assert len(set(predictions.values())) > 1  # not one report for everyone


def test_another_patients_slide_moves_the_stated_grade(reader):
    result = grounding_check(str(reader.run), reader.store, reader.generated, reader.annotations, max_new_tokens=24)
    swapped = result.scores["swapped"]
    assert result.verdict == "follows the slide", result.as_dict()
    assert swapped["agrees_with_donor_grade"] >= FOLLOWS_DONOR and swapped["agrees_with_own_grade"] <= 0.2
    assert swapped["grade_changed"] >= 0.8, result.as_dict()
    assert result.n == len(reader.rows) and all(reader.rows)  # every held-out report had a donor of another grade
    assert result.scores["blank"]["text_changed"] > 0  # blank tiles change the report too
    assert result.scores["original"]["matches_predictions"] == 1.0 and not result.notes  # the same greedy reports


@pytest.fixture(scope="module")
def blind(tmp_path_factory) -> Reporter:
    """The same recipe on a store whose every tile is the same vector: the slides carry nothing."""
    return trained_reporter(tmp_path_factory.mktemp("blind"), "--num_train_epochs", "4", constant_tiles=True)


def test_a_reporter_given_constant_tiles_is_called_image_blind(blind):
    result = grounding_check(str(blind.run), blind.store, blind.generated, blind.annotations, max_new_tokens=24)
    assert result.verdict == "image-blind", result.as_dict()
    assert result.scores["swapped"]["grade_changed"] == 0 and result.scores["swapped"]["text_changed"] == 0


def test_donors_are_other_patients_of_another_grade_and_the_verdicts():
    grades = {"a": "G1", "b": "G1", "c": "G3", "d": None, "e": "G2"}
    patients = {"a": "P1", "b": "P2", "c": "P1", "d": "P3", "e": "P4"}
    donors = choose_donors(grades, patients, seed=0)
    assert set(donors) == {"a", "b", "c", "e"}  # d states no grade
    assert donors["a"] == "e" and donors["c"] in {"b", "e"}  # a's other-grade slides: c (same patient) or e
    assert choose_donors(grades, patients, seed=0) == donors  # seeded
    donors, truth = {"a": "x", "b": "x"}, {"a": "G1", "b": "G1", "x": "G3"}
    original = {"a": "Tumour grade: G1.", "b": "Tumour grade: G1."}
    texts = {"original": original, "swapped": dict(original), "blank": dict(original)}
    scores = grounding_scores(texts, donors, truth)
    assert verdict_of(scores) == "image-blind" and scores["swapped"]["agrees_with_donor_grade"] == 0
    texts["swapped"] = {"a": "Tumour grade: G3.", "b": "Tumour grade: G3."}
    scores = grounding_scores(texts, donors, truth)
    assert verdict_of(scores) == "follows the slide" and scores["swapped"]["grade_changed"] == 1.0
    texts["swapped"] = {"a": "Tumour grade: G3.", "b": "Tumour grade: G2."}
    assert verdict_of(grounding_scores(texts, donors, truth)) == "partly follows the slide"
    silent = {"a": "Invasive carcinoma.", "b": "Carcinoma."}  # no grade stated: nothing to follow, not "blind"
    texts = {"original": silent, "swapped": {"a": "Carcinoma.", "b": "Invasive."}, "blank": dict(silent)}
    assert verdict_of(grounding_scores(texts, donors, truth)).startswith("undetermined")
