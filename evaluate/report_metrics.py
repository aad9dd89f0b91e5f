"""Scores for generated reports: caption metrics (pycocoevalcap, as InternVL's caption eval) and
clinical correctness (grade and risk group read back from the text and scored like a head).

Java is needed by the PTB tokenizer and METEOR (Debian: `default-jre-headless`). Without it the report
says so: tokens are then lower-cased words (BLEU, ROUGE-L and CIDEr still run) and METEOR is skipped.
References are a jsonl or HistGen's annotation JSON (every set); their ids match the predicted slides as
`train.import_reports` matches report ids (exactly, by TCGA barcode, a patient id for all its slides).
Predictions repeating an id are refused.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score

from evaluate.histgen_protocol import meteor_scorer
from evaluate.report_grades import HIGH_LOW, RISK_LEVEL, G, stated_grade, stated_prognosis
from evaluate.report_inputs import ids_and_texts, read_references
from slidecache.cohorts.clinical import ClinicalTable
from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError
from slidecache.jsonl import read_jsonl
from train.generation_checks import check_generations

_WORD = re.compile(r"[a-z0-9]+")


def parse_grade(text: str) -> str | None:
    """The grade a text states, as a clinical table writes it: 'G1'..'G4' (any G-scale system: Fuhrman,
    Nottingham, WHO, differentiation), else 'High Grade' / 'Low Grade'; None when it states none."""
    numeric = stated_grade(text, G)
    return f"G{numeric}" if numeric is not None else stated_grade(text, HIGH_LOW)


def parse_risk(text: str) -> str | None:
    return stated_prognosis(text)


@dataclass
class ReportScores:
    caption: dict[str, float]
    clinical: dict[str, Any]
    notes: list[str]
    n: int


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]], notes: list[str]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    have_java = shutil.which("java") is not None
    if have_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
        gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k]] for k in predictions})
    else:
        notes.append("no Java runtime: PTB tokenizer replaced by lower-cased words; METEOR skipped "
                     "(install a JRE, e.g. Debian's default-jre-headless)")
        res = {k: [" ".join(_WORD.findall(v.lower()))] for k, v in predictions.items()}
        gts = {k: [" ".join(_WORD.findall(r.lower())) for r in references[k]] for k in predictions}
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    if have_java:
        scores["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def clinical_correctness(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, Any]:
    """Grade and risk stated in each generated report vs the reference report."""
    pairs = [(parse_grade(predictions[k]), parse_grade(references[k][0])) for k in predictions]
    stated = [(p, r) for p, r in pairs if r is not None]
    out: dict[str, Any] = {"grade_reference_count": len(stated),
                           "grade_stated_rate": float(np.mean([p is not None for p, _ in stated])) if stated else None}
    both = [(p, r) for p, r in stated if p is not None]
    if both:
        labels = sorted({x for pair in both for x in pair})
        out["grade_accuracy"] = float(np.mean([p == r for p, r in both]))
        if len(labels) > 1:
            out["grade_qwk"] = float(cohen_kappa_score([labels.index(r) for _, r in both], [labels.index(p) for p, _ in both],
                                                       weights="quadratic"))
    risks = [(parse_risk(predictions[k]), parse_risk(references[k][0])) for k in predictions]
    risk_both = [(p, r) for p, r in risks if p and r]
    if risk_both:
        out["risk_accuracy"] = float(np.mean([p == r for p, r in risk_both]))
        out["risk_stated_rate"] = float(np.mean([p is not None for p, r in risks if r]))
    return out


def stated_risk_concordance(predictions: dict[str, str], clinical: ClinicalTable, endpoint: str,
                            patient_of: dict[str, str] | None = None) -> dict[str, Any]:
    """Harrell's C of the risk group each report states (low < intermediate < high) against the patient's
    observed `endpoint`: scored like a survival head. `patient_of` maps report ids to patients (the
    predictions' `patient_id` fields); otherwise ids are TCGA barcodes or patient ids."""
    from evaluate.survival_metrics import harrell_c

    levels, times, events, unmatched = [], [], [], 0
    for key, text in predictions.items():
        patient = clinical.patients.get((patient_of or {}).get(key) or patient_key(key))
        risk = parse_risk(text)
        if patient is None or endpoint not in patient.endpoints:
            unmatched += 1
            continue
        if risk is None:
            continue
        levels.append(RISK_LEVEL[risk])
        times.append(patient.endpoints[endpoint].time_days)
        events.append(patient.endpoints[endpoint].event)
    out: dict[str, Any] = {"stated_risk_endpoint": endpoint, "stated_risk_scored": len(levels),
                           "stated_risk_unmatched": unmatched}
    if len(levels) >= 2 and any(events) and len(set(levels)) > 1:
        out["stated_risk_harrell_c"] = harrell_c(np.array(times), np.array(events), np.array(levels, dtype=float))
    return out


def score_reports(predictions_path: str | Path, references_path: str | Path, clinical: ClinicalTable | None = None,
                  endpoint: str = "OS") -> ReportScores:
    from evaluate.report_inputs import duplicate_ids_error, prediction_patients

    lines: dict[str, list[int]] = {}
    predictions = {k: v[0] for k, v in ids_and_texts(Path(predictions_path), lines).items()}
    if (error := duplicate_ids_error(predictions_path, lines)) is not None:
        raise error
    references = read_references(Path(references_path), prediction_patients(predictions_path))
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise EvaluationError(f"{len(missing)} predictions have no reference (e.g. {missing[:3]}) in {references_path}")
    if not predictions:
        raise EvaluationError(f"{predictions_path} holds no predictions")
    check = check_generations(list(predictions.values()))
    if check.all_empty:
        raise EvaluationError(f"{predictions_path}: all {check.reports} generated reports are empty: nothing to score "
                              "(is the checkpoint trained? does generation stop at once?)")
    notes: list[str] = check.warnings()
    correctness = clinical_correctness(predictions, references)
    if clinical is not None:
        patient_of = {str(row.get("id", row.get("slide_id"))): str(row["patient_id"])
                      for _, row in read_jsonl(predictions_path, EvaluationError) if "patient_id" in row}
        correctness.update(stated_risk_concordance(predictions, clinical, endpoint, patient_of))
        if "stated_risk_harrell_c" not in correctness:
            notes.append(f"stated-risk C-index not computed: needs >= 2 reports stating different risk groups for "
                         f"patients with {endpoint} in the clinical table, and one event")
    return ReportScores(caption_scores(predictions, references, notes), correctness, notes, len(predictions))
