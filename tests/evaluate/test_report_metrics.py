"""Report metrics: pycocoevalcap scores, grade/risk read back from the text, bad files named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from evaluate.report_metrics import clinical_correctness, parse_grade, parse_risk, score_reports
from slidecache.errors import EvaluationError
from tests.conftest import REPO_ROOT

REFS = {f"S{i}": f"Tumour grade: G{1 + i % 3}. Invasive carcinoma with {'high' if i % 2 else 'low'} mitotic activity. "
                 f"Prognosis: {'high' if i % 2 else 'low'} risk." for i in range(8)}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, grade, risk", [
    ("Tumour grade: G2. Prognosis: high risk.", "G2", "high"),
    ("grade 3 carcinoma, low-risk features", "G3", "low"),
    ("A high-grade urothelial carcinoma.", "High Grade", None),
    ("No grade given.", None, None),
])
def test_parsing(text, grade, risk):
    assert parse_grade(text) == grade and parse_risk(text) == risk


def test_perfect_and_wrong_reports(tmp_path):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": k, "text": v} for k, v in REFS.items()])
    same = write_jsonl(tmp_path / "same.jsonl", [{"id": k, "text": v} for k, v in REFS.items()])
    perfect = score_reports(same, refs)
    assert perfect.caption["BLEU-4"] > 0.99 and perfect.caption["ROUGE-L"] > 0.99
    assert perfect.clinical["grade_accuracy"] == 1.0 and perfect.clinical["risk_accuracy"] == 1.0
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"id": k, "text": "Tumour grade: G4. Prognosis: low risk. Benign."} for k in REFS])
    bad = score_reports(wrong, refs)
    assert bad.caption["BLEU-4"] < perfect.caption["BLEU-4"] and bad.caption["CIDEr"] < perfect.caption["CIDEr"]
    assert bad.clinical["grade_accuracy"] == 0.0 and bad.clinical["risk_accuracy"] == 0.5
    if shutil.which("java"):
        assert 0 < bad.caption["METEOR"] < perfect.caption["METEOR"]


def test_conversation_references_and_errors(tmp_path):
    conv = write_jsonl(tmp_path / "conv.jsonl", [
        {"id": 0, "slide": "S0", "conversations": [{"from": "human", "value": "<image>\\nReport?"}, {"from": "gpt", "value": REFS["S0"]}]}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": 0, "text": REFS["S0"]}])
    assert score_reports(preds, conv).clinical["grade_accuracy"] == 1.0
    (tmp_path / "broken.jsonl").write_text('{"id": 1, "text": "ok"}\n{not json\n')
    with pytest.raises(EvaluationError, match="broken.jsonl, line 2: not JSON"):
        score_reports(tmp_path / "broken.jsonl", conv)
    orphan = write_jsonl(tmp_path / "orphan.jsonl", [{"id": "nobody", "text": "x"}])
    with pytest.raises(EvaluationError, match="have no reference"):
        score_reports(orphan, conv)


def test_without_java_meteor_is_skipped_and_said(tmp_path):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": k, "text": v} for k, v in REFS.items()])
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no java on this PATH
    run = subprocess.run([sys.executable, "-m", "evaluate", "report", "--predictions", str(refs), "--references", str(refs)],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "METEOR skipped" in run.stdout and "BLEU-4" in run.stdout and "METEOR " not in run.stdout.split("note:")[0]


def test_clinical_correctness_counts_only_stated_references():
    out = clinical_correctness({"a": "G2", "b": "nothing"}, {"a": ["Tumour grade: G2"], "b": ["no grade here"]})
    assert out["grade_reference_count"] == 1 and out["grade_accuracy"] == 1.0


def test_stated_risk_is_scored_like_a_head(tmp_path):
    from slidecache.cohorts.clinical import load_clinical

    # High-risk reports (odd ids) belong to patients who died early: the stated risk ranks them perfectly.
    table = tmp_path / "clinical.csv"
    table.write_text("patient_id,OS,OS.time\n" + "".join(f"S{i},1,{100 if i % 2 else 2000 + i}\n" for i in range(8)))
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": k, "text": v} for k, v in REFS.items()])
    right = score_reports(refs, refs, load_clinical(table), "OS")
    # Pairs within one stated group are risk ties (0.5 each), so perfect grouping gives < 1.
    assert right.clinical["stated_risk_harrell_c"] > 0.8
    assert right.clinical["stated_risk_scored"] == 8 and right.clinical["stated_risk_unmatched"] == 0
    flipped = write_jsonl(tmp_path / "flipped.jsonl", [
        {"id": k, "text": v.replace("high risk", "X").replace("low risk", "high risk").replace("X", "low risk")}
        for k, v in REFS.items()])
    wrong = score_reports(flipped, refs, load_clinical(table), "OS").clinical["stated_risk_harrell_c"]
    assert wrong == pytest.approx(1 - right.clinical["stated_risk_harrell_c"])


def test_generation_hygiene_is_counted_and_an_all_empty_run_is_refused(tmp_path):
    """Empty, undecodable (U+FFFD) and all-identical generations are told with counts before any score;
    scoring reports that are all empty exits 2 with one line saying so (issue 26)."""
    from tests.readme import run_main
    from train.generation_checks import check_generations

    check = check_generations(["", "Tumour grade: G\ufffd", "Tumour grade: G\ufffd T", "  "])
    assert (check.reports, check.empty, check.undecodable, check.distinct) == (4, 2, 2, 2) and not check.all_identical
    assert check_generations(["same", "same", "same"]).all_identical and not check_generations(["one"]).all_identical
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": k, "text": v} for k, v in REFS.items()])
    garbled = write_jsonl(tmp_path / "garbled.jsonl",
                          [{"id": k, "text": "Tumour grade: G\ufffd Tgnosis"} for k in REFS])
    result = run_main("evaluate", ["report", "--predictions", str(garbled), "--references", str(refs)], tmp_path)
    assert result.code == 0, result.log
    assert "8 of 8 generated reports contain undecodable text (U+FFFD)" in result.stdout
    assert "all 8 generated reports are identical" in result.stdout
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": k, "text": ""} for k in REFS])
    result = run_main("evaluate", ["report", "--predictions", str(empty), "--references", str(refs)], tmp_path)
    assert result.code == 2 and "all 8 generated reports are empty: nothing to score" in result.stderr
    assert "Traceback" not in result.log
