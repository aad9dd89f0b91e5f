"""Report datasets in the formats users have (HistGen's annotation JSON, a TCGA-Reports CSV) imported into
annotations + meta + a train/val/test split; each stage uses only its set; and the whole path: import →
train (tiny) → generate (test set) → `evaluate report --protocol histgen` with baselines and grade checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slidecache.cohorts.reports import read_histgen, read_report_csv
from slidecache.cohorts.splits import read_set_split
from slidecache.errors import AnnotationError
from store import EmbeddingStore
from tests.evaluate.report_fixtures import CLINICAL, HISTGEN_JSON, REPORTS_CSV, fixture_slides, report_store
from tests.readme import Result, run_main, to_argv
from train.data import load_samples, select_by_split
from train.import_reports import import_reports

TWO_SET_PATIENT = "TCGA-F1-P007"
IMPORT_HISTGEN = ("python -m train.import_reports --store STORE --histgen annotation.json --out reports "
                  "[--append-clinical --clinical TABLE] [--ask-grade-prognosis] [--strict-patients] [--skip-missing]")
IMPORT_CSV = ("python -m train.import_reports --store STORE --reports-csv TCGA_Reports.csv [--split split.csv] "
              "[--seed 0] --out reports")
TRAIN_HISTGEN = ("python -m train --config configs/train/histgen-internvl2-1b-lora.yaml --meta_path reports/meta.json "
                 "--store STORE --split reports/split.csv --output_dir runs/reports")
GENERATE = ("python -m train.generate --checkpoint runs/reports --store STORE --meta_path reports/meta.json "
            "--split reports/split.csv --out gen.jsonl")
REPORT_HISTGEN = ("python -m evaluate report --protocol histgen --predictions gen.jsonl --references "
                  "reports/annotations.jsonl [--store STORE] [--clinical TABLE] --out scores")


def cli(module: str, *args: str, cwd: Path) -> Result:
    return run_main(module, args, cwd)


def readme_cli(command: str, cwd: Path, *extra: str, **values: str) -> Result:
    run = to_argv(command, values)
    return run_main(run.module, [*run.args, *extra], cwd, run.env)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return report_store(tmp_path_factory.mktemp("reports"))


@pytest.mark.readme(IMPORT_HISTGEN)
def test_histgen_json_keeps_its_split_and_warns_about_a_patient_in_two_sets(store_url, tmp_path):
    shutil.copy(HISTGEN_JSON, tmp_path / "annotation.json")
    run = readme_cli(IMPORT_HISTGEN, tmp_path, STORE=store_url)
    assert run.code == 0, run.stderr
    assert "wrote 40 annotations (train 28, val 3, test 9)" in run.stdout
    assert "warning: 1 patients have slides in two sets" in run.stdout and TWO_SET_PATIENT in run.stdout
    assert read_set_split(tmp_path / "reports" / "split.csv") == fixture_slides()
    rows = [json.loads(line) for line in (tmp_path / "reports" / "annotations.jsonl").read_text().splitlines()]
    given = {r.key: r.text for r in read_histgen(HISTGEN_JSON)}
    assert all(r["report"] == given[r["slide"]] == r["conversations"][1]["value"] for r in rows)
    assert "grade" not in rows[0]["conversations"][0]["value"]  # the plain question unless asked
    meta = json.loads((tmp_path / "reports" / "meta.json").read_text())
    assert meta["slide_reports"]["length"] == 40

    strict = cli("train.import_reports", "--store", store_url, "--histgen", str(HISTGEN_JSON), "--out", "strict",
                 "--strict-patients", cwd=tmp_path)
    assert strict.code != 0 and TWO_SET_PATIENT in strict.stderr
    assert "in train" in strict.stderr and "in test" in strict.stderr and "DX1" in strict.stderr and "DX2" in strict.stderr
    assert not (tmp_path / "strict").exists()


def test_slides_missing_from_the_store_are_listed_and_skipped_only_on_request(tmp_path):
    missing = sorted(fixture_slides())[:2]
    url = report_store(tmp_path, leave_out=tuple(missing))
    run = cli("train.import_reports", "--store", url, "--histgen", str(HISTGEN_JSON), "--out", "out", cwd=tmp_path)
    assert run.code != 0 and "2 of 40 reports" in run.stderr and missing[0] in run.stderr
    assert "--skip-missing" in run.stderr and not (tmp_path / "out").exists()
    skipped = cli("train.import_reports", "--store", url, "--histgen", str(HISTGEN_JSON), "--out", "out",
                  "--skip-missing", cwd=tmp_path)
    assert skipped.code == 0 and "wrote 38 annotations" in skipped.stdout and "skipped 2 reports" in skipped.stdout


@pytest.mark.readme(IMPORT_CSV)
def test_csv_of_patient_reports_gets_a_patient_level_split(store_url, tmp_path):
    shutil.copy(REPORTS_CSV, tmp_path / "TCGA_Reports.csv")
    run = readme_cli(IMPORT_CSV, tmp_path, STORE=store_url)
    assert run.code == 0 and "wrote 40 annotations (train 27, val 4, test 9)" in run.stdout, run.stderr
    store = EmbeddingStore.open(store_url)
    reports = read_report_csv(REPORTS_CSV)
    first = import_reports(store, reports, seed=0)
    again = import_reports(store, reports, seed=0)
    assert [r["split"] for r in first.rows] == [r["split"] for r in again.rows]  # the seed fixes it
    sets: dict[str, set[str]] = {}
    for row in first.rows:
        sets.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sets.values()) and not first.patients_in_two_sets
    counts = {s: sum(1 for v in sets.values() if s in v) for s in ("train", "val", "test")}
    assert counts == {"train": 27, "val": 4, "test": 8}  # 39 patients, 7:1:2
    assert len(first.rows) == 40  # the patient report reaches both of TCGA-F1-P007's slides
    bad = tmp_path / "bad.csv"
    bad.write_text("barcode,words\nTCGA-F0-P000,text\n")
    with pytest.raises(AnnotationError, match="no id column.*--id-column"):
        read_report_csv(bad)


def test_each_stage_uses_only_its_set(store_url, tmp_path):
    run = cli("train.import_reports", "--store", store_url, "--histgen", str(HISTGEN_JSON), "--out", "imp",
              "--append-clinical", "--clinical", str(CLINICAL), "--ask-grade-prognosis", cwd=tmp_path)
    assert run.code == 0, run.stderr
    store = EmbeddingStore.open(store_url)
    samples = load_samples(str(tmp_path / "imp" / "meta.json"), 0)
    truth = fixture_slides()
    for role in ("train", "val", "test"):
        kept, unknown = select_by_split(samples, store, str(tmp_path / "imp" / "split.csv"), -1, role)
        assert unknown == 0 and {s.slides[0] for s in kept} == {k for k, v in truth.items() if v == role}
    with pytest.raises(AnnotationError, match="drop --fold"):
        select_by_split(samples, store, str(tmp_path / "imp" / "split.csv"), 0, "train")
    answer = json.loads((tmp_path / "imp" / "annotations.jsonl").read_text().splitlines()[0])["conversations"][1]["value"]
    assert "Tumour grade:" in answer or "Prognosis:" in answer


@pytest.mark.readme(TRAIN_HISTGEN)
@pytest.mark.readme(GENERATE)
@pytest.mark.readme(REPORT_HISTGEN)
@pytest.mark.recipe("histgen-internvl2-1b-lora.yaml")
def test_import_train_generate_and_score_as_histgen(store_url, saved_tiny_llm, tmp_path):
    """The fixtures through every step, the README's commands as printed, in a fresh folder; the recipe at
    its own settings (its hub id read as a saved random-init tiny Qwen2: tests/readme.py's table)."""
    shutil.copy(HISTGEN_JSON, tmp_path / "annotation.json")
    steps = [
        to_argv(IMPORT_HISTGEN, {"STORE": store_url}).args,
        to_argv(TRAIN_HISTGEN, {"STORE": store_url}, llm_dir=saved_tiny_llm).args,
        to_argv(GENERATE, {"STORE": store_url}).args,
        to_argv(REPORT_HISTGEN, {"STORE": store_url}).args,
    ]
    for module, args in zip(["train.import_reports", "train", "train.generate", "evaluate"], steps):
        run = cli(module, *args, cwd=tmp_path)
        assert run.code == 0, f"{module}: {run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    assert "BLEU-4" in run.stdout and "no retrieval baseline: give --store" in run.stdout
    manifest = json.loads((tmp_path / "runs" / "reports" / "run_manifest.json").read_text())
    assert manifest["data_counts"]["train_samples"] == 28 and manifest["data_counts"]["val_samples"] == 3
    recipe = manifest["config"]["training"]
    assert (recipe["per_device_train_batch_size"], recipe["gradient_accumulation_steps"]) == (4, 4)  # its own
    summary = json.loads((tmp_path / "runs" / "reports" / "train_summary.json").read_text())
    assert summary["gradient_checkpointing"] is True  # it reached the LLM's layers
    val_losses = [h["eval_loss"] for h in summary["log_history"] if "eval_loss" in h]
    assert val_losses and summary["best_metric"] == pytest.approx(min(val_losses))
    assert summary["best_checkpoint"] and Path(summary["best_checkpoint"]).name.startswith("checkpoint-")
    generated = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert {g["id"] for g in generated} == {k for k, v in fixture_slides().items() if v == "test"}
    run = readme_cli(REPORT_HISTGEN, tmp_path, "--store", store_url, "--clinical", str(CLINICAL), "--out", "scores",
                     STORE=store_url)
    assert run.code == 0, run.stderr
    scores = json.loads((tmp_path / "scores" / "report_metrics.json").read_text())
    assert scores["test_reports"] == 9 and scores["protocol"]["training_reports"] == 28
    assert set(scores["baselines"]) == {"most_frequent_training_report", "nearest_training_report_by_embedding"}
    for table in (scores["model"], *scores["baselines"].values()):
        assert {"BLEU-1", "BLEU-4", "ROUGE-L"} <= set(table) and all(0 <= v <= 1 for v in table.values())
    # the fixture's slides carry their cancer type: the nearest report shares far more than the most frequent
    assert (scores["baselines"]["nearest_training_report_by_embedding"]["BLEU-4"]
            > scores["baselines"]["most_frequent_training_report"]["BLEU-4"])
    references = scores["clinical_correctness"]["references"]
    assert references["KIRC"]["accuracy"] == 1.0 and references["BLCA"]["accuracy"] == 1.0
    assert references["PRAD"]["scored"].startswith("coverage only") and references["PRAD"]["coverage"] == 1.0
    assert "provenance" in scores


def test_histgen_protocol_refuses_predictions_outside_the_test_set(store_url, tmp_path):
    train_slide = next(k for k, v in fixture_slides().items() if v == "train")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"id": train_slide, "text": "anything"}) + "\n")
    run = cli("evaluate", "report", "--protocol", "histgen", "--predictions", str(predictions), "--references",
              str(HISTGEN_JSON), cwd=tmp_path)
    assert run.code != 0 and "outside the test set" in run.stderr and train_slide in run.stderr
