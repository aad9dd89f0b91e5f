"""`python -m evaluate report` on the inputs users have (issue 27, items 4, 6, 7): predictions repeating an
id refused naming ids, lines and file; a HistGen JSON as --references matched to the predicted slides as
`train.import_reports` matches it (barcodes, patient ids); empty reference reports refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.evaluate.report_fixtures import HISTGEN_JSON, fixture_slides, report_store
from tests.readme import Result, run_main

TWO_SET_PATIENT = "TCGA-F1-P007"  # a slide in train and one in test: its ids stay slide-level


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    return report_store(tmp_path_factory.mktemp("report_inputs"))


def histgen() -> dict[str, list[dict[str, Any]]]:
    return json.loads(HISTGEN_JSON.read_text())


def reference_texts() -> dict[str, str]:
    return {e["id"]: e["report"] for entries in histgen().values() for e in entries}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_slides() -> list[str]:
    return sorted(k for k, v in fixture_slides().items() if v == "test")


test_slides.__test__ = False  # a helper, not a test


def predictions(path: Path) -> Path:
    """What train.generate writes for the test slides: full slide ids, their patients, here the reference text."""
    texts = reference_texts()
    return write_jsonl(path, [{"id": s, "slide": s, "patient_id": s[:12], "text": texts[s]} for s in test_slides()])


def evaluate(*args: str, cwd: Path) -> Result:
    return run_main("evaluate", ["report", *args], cwd)


def test_duplicate_prediction_ids_are_refused_naming_the_ids_their_lines_and_the_file(tmp_path):
    texts = reference_texts()
    slides = test_slides()
    rows = [{"id": s, "text": texts[s]} for s in slides]
    rows.insert(4, {"id": slides[1], "text": "Benign tissue, no tumour."})  # line 5 predicts line 2's slide again
    preds = write_jsonl(tmp_path / "gen.jsonl", rows)
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": s, "text": texts[s]} for s in slides])
    for references, protocol in ((refs, "default"), (HISTGEN_JSON, "histgen")):
        run = evaluate("--protocol", protocol, "--predictions", str(preds), "--references", str(references),
                       "--out", protocol, cwd=tmp_path)
        assert run.code == 2, (protocol, run.stdout[-500:])
        assert f"{preds}: 1 ids have more than one prediction: {slides[1]} (lines 2, 5)" in run.stderr
        assert "keep one prediction per id" in run.stderr and len(run.stderr.strip().splitlines()) == 1
        assert not (tmp_path / protocol).exists()


def barcoded(data: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """HistGen's JSON with short ids, as other copies give them: the slide barcode (no uuid) or the patient."""
    def short(i: int, slide: str) -> str:
        return slide.split(".")[0] if i % 2 or slide.startswith(TWO_SET_PATIENT) else slide[:12]

    return {split: [dict(e, id=short(i, e["id"])) for i, e in enumerate(entries)] for split, entries in data.items()}


def test_a_histgen_json_of_barcodes_and_patient_ids_matches_the_predicted_slides_as_the_import_does(store_url,
                                                                                                    tmp_path):
    preds = predictions(tmp_path / "gen.jsonl")
    short = tmp_path / "short.json"
    short.write_text(json.dumps(barcoded(histgen()), indent=2))
    imported = run_main("train.import_reports", ["--store", store_url, "--histgen", str(short), "--out", "imp"],
                        tmp_path)
    assert imported.code == 0 and "wrote 40 annotations (train 28, val 3, test 9)" in imported.stdout  # as before

    scored = {}
    for name, references in (("full", HISTGEN_JSON), ("short", short)):
        run = evaluate("--protocol", "histgen", "--predictions", str(preds), "--references", str(references),
                       "--store", store_url, "--out", name, cwd=tmp_path)
        assert run.code == 0, run.stderr
        scored[name] = json.loads((tmp_path / name / "report_metrics.json").read_text())
    full, matched = scored["full"], scored["short"]
    assert matched["test_reports"] == 9 and matched["test_reports_without_prediction"] == 0
    assert matched["protocol"]["training_reports"] == 28
    assert matched["model"] == full["model"] and matched["model"]["BLEU-1"] == pytest.approx(1.0)
    assert matched["baselines"] == full["baselines"]  # training reports matched to the store's slides too
    assert set(matched["baselines"]) == {"most_frequent_training_report", "nearest_training_report_by_embedding"}

    default = evaluate("--predictions", str(preds), "--references", str(short), "--out", "default", cwd=tmp_path)
    assert default.code == 0, default.stderr
    caption = json.loads((tmp_path / "default" / "report_metrics.json").read_text())
    assert caption["n"] == 9 and caption["caption"]["BLEU-1"] == pytest.approx(1.0)

    clash = barcoded(histgen())
    patient_entry = next(e for e in clash["test"] if len(e["id"]) == 12)
    clash["test"].append(dict(patient_entry, id=patient_entry["id"] + "-01Z-00-DX1", report="Another report."))
    (tmp_path / "clash.json").write_text(json.dumps(clash))
    run = evaluate("--protocol", "histgen", "--predictions", str(preds), "--references", str(tmp_path / "clash.json"),
                   cwd=tmp_path)
    assert run.code == 2 and "clash.json" in run.stderr and "both match slide" in run.stderr
    assert f"'{patient_entry['id']}'" in run.stderr and f"'{patient_entry['id']}-01Z-00-DX1'" in run.stderr


def test_empty_reference_reports_are_refused_not_made_the_most_frequent_baseline(store_url, tmp_path):
    preds = predictions(tmp_path / "gen.jsonl")
    data = histgen()
    for entry in data["train"][:3]:  # three empty training reports: the most frequent "report"
        entry["report"] = ""
    (tmp_path / "annotation.json").write_text(json.dumps(data))
    run = evaluate("--protocol", "histgen", "--predictions", str(preds), "--references",
                   str(tmp_path / "annotation.json"), cwd=tmp_path)
    assert run.code == 2 and "annotation.json, train[0]: empty report" in run.stderr
    assert data["train"][0]["id"] in run.stderr

    rows = [{"id": e["id"], "report": e["report"], "split": split} for split, es in data.items() for e in es]
    annotations = write_jsonl(tmp_path / "annotations.jsonl", rows)
    run = evaluate("--protocol", "histgen", "--predictions", str(preds), "--references", str(annotations),
                   cwd=tmp_path)
    assert run.code == 2 and f"{annotations}, line 1: {rows[0]['id']} has an empty \"report\"" in run.stderr
