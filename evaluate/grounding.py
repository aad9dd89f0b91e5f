"""Does the reporter read the slide? The grounding check of a trained reporter on held-out reports.

Each held-out report is regenerated with its slide's tiles swapped for those of another held-out patient
whose reference states a different grade (the donor), and with blank tiles (train/grounding.py). Scored:
- the grade each version states against the slide's own reference grade and against the donor's;
- the share of reports whose text, stated grade or stated risk changes when the slide changes.
A falling training loss cannot show this: every word but the grade and risk is learnable without the image
(issue 26: a reporter with a falling loss stated the grade at chance and wrote one report for everyone).
Verdict: `undetermined` when most regenerated reports state no grade (nothing to follow); `follows the slide`
when at least FOLLOWS_DONOR of the swapped reports state the donor's grade; `image-blind` when under
BLIND_CHANGE of them state another grade than the original did; else `partly follows the slide`. The check
regenerates the reports from the checkpoint, so it says how many of the regenerated originals equal the
predictions given: far fewer means the predictions came from another model or other settings.
None of the report-generation tools we know (HistGen, SlideChat, WSI-LLaVA) report this; we do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluate.report_metrics import parse_grade, parse_risk
from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError
from slidecache.jsonl import read_jsonl

FOLLOWS_DONOR = 0.7  # share of swapped reports stating the donor's grade for "follows the slide"
BLIND_CHANGE = 0.1  # share of swapped reports whose stated grade changes, below which the reporter is blind


@dataclass
class GroundingResult:
    n: int  # reports regenerated (those with a donor)
    donors: dict[str, str]  # id → donor id
    texts: dict[str, dict[str, str]]  # condition → id → text
    scores: dict[str, Any]
    verdict: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "verdict": self.verdict, "scores": self.scores, "notes": self.notes,
                "donors": self.donors}


def choose_donors(grades: dict[str, str | None], patients: dict[str, str], seed: int = 0) -> dict[str, str]:
    """For each id with a reference grade, a donor id of another patient whose reference grade differs,
    drawn with `seed` (ids without a grade, or without any such donor, get none)."""
    rng = np.random.default_rng(seed)
    graded = sorted(i for i, g in grades.items() if g is not None)
    donors = {}
    for i in graded:
        candidates = [j for j in graded if grades[j] != grades[i] and patients[j] != patients[i]]
        if candidates:
            donors[i] = candidates[int(rng.integers(len(candidates)))]
    return donors


def _share(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def grounding_scores(texts: dict[str, dict[str, str]], donors: dict[str, str], grades: dict[str, str | None]
                     ) -> dict[str, Any]:
    """Per condition: stated-grade rate and agreement with the own (and, swapped, the donor's) reference grade;
    swapped and blank against the original: shares whose text, stated grade and stated risk changed."""
    ids = sorted(donors)
    stated = {c: {i: parse_grade(texts[c][i]) for i in ids} for c in texts}
    risk = {c: {i: parse_risk(texts[c][i]) for i in ids} for c in texts}
    scores: dict[str, Any] = {}
    for condition in texts:
        row: dict[str, Any] = {
            "grade_stated_rate": _share([stated[condition][i] is not None for i in ids]),
            "agrees_with_own_grade": _share([stated[condition][i] == grades[i] for i in ids]),
        }
        if condition == "swapped":
            row["agrees_with_donor_grade"] = _share([stated[condition][i] == grades[donors[i]] for i in ids])
        if condition != "original":
            row["text_changed"] = _share([texts[condition][i] != texts["original"][i] for i in ids])
            row["grade_changed"] = _share([stated[condition][i] != stated["original"][i] for i in ids])
            row["risk_changed"] = _share([risk[condition][i] != risk["original"][i] for i in ids])
        row["distinct_texts"] = len(set(texts[condition][i] for i in ids))
        scores[condition] = row
    return scores


def verdict_of(scores: dict[str, Any]) -> str:
    if (scores["original"]["grade_stated_rate"] or 0.0) < 0.5:
        return "undetermined: most reports state no grade"
    swapped = scores["swapped"]
    if (swapped["agrees_with_donor_grade"] or 0.0) >= FOLLOWS_DONOR:
        return "follows the slide"
    if (swapped["grade_changed"] or 0.0) < BLIND_CHANGE:
        return "image-blind"
    return "partly follows the slide"


def _references(path: str | Path) -> dict[str, str]:
    """id → reference text (the first assistant turn of an InternVL conversation, or text/answer/caption)."""
    out = {}
    for number, row in read_jsonl(path, EvaluationError):
        key = row.get("id", row.get("slide_id"))
        text = next((row[k] for k in ("text", "answer", "caption") if k in row), None)
        if text is None and "conversations" in row:
            text = next((t["value"] for t in row["conversations"] if t.get("from") in ("gpt", "assistant")), None)
        if key is None or text is None:
            raise EvaluationError(f"{path}, line {number}: needs an id and a reference text or conversations")
        out.setdefault(str(key), str(text))
    return out


def grounding_check(checkpoint: str, store_url: str, predictions: str | Path, references: str | Path,
                    seed: int = 0, batch_size: int = 8, max_new_tokens: int = 128, device: str = "auto"
                    ) -> GroundingResult:
    """The check on the reports of `predictions` (their ids and patients; the texts are regenerated greedily with
    the same settings in all three conditions), prompts and reference grades from `references` (the annotations)."""
    from train.grounding import ablated_reports  # the model is built only when the check is asked for

    rows = [row for _, row in read_jsonl(predictions, EvaluationError)]
    ids = [str(r.get("id", r.get("slide_id"))) for r in rows]
    patients = {i: str(r.get("patient_id") or patient_key(i)) for i, r in zip(ids, rows)}
    reference = _references(references)
    missing = sorted(set(ids) - set(reference))
    if missing:
        raise EvaluationError(f"{len(missing)} predictions have no reference (e.g. {missing[:3]}) in {references}")
    grades = {i: parse_grade(reference[i]) for i in ids}
    donors = choose_donors(grades, patients, seed)
    notes = []
    if len(donors) < len(ids):
        notes.append(f"{len(ids) - len(donors)} of {len(ids)} reports have no donor (their reference states no grade, "
                     "or no other patient's states another): left out of the grounding check")
    if not donors:
        raise EvaluationError("no report can be swapped: the grounding check needs held-out references stating at "
                              "least two different grades, from two patients")
    texts = ablated_reports(checkpoint, store_url, references, donors, batch_size, max_new_tokens, seed, device)
    scores = grounding_scores(texts, donors, grades)
    given = {i: str(r.get("text", "")).strip() for i, r in zip(ids, rows)}
    same = sum(texts["original"][i] == given[i] for i in donors)
    scores["original"]["matches_predictions"] = same / len(donors)
    if same < 0.9 * len(donors):
        notes.append(f"only {same} of {len(donors)} reports regenerated from {checkpoint} (greedy, "
                     f"{max_new_tokens} new tokens) equal the predictions given: were they made by this checkpoint, "
                     "with these settings? The check scores the regenerated reports")
    return GroundingResult(len(donors), donors, texts, scores, verdict_of(scores), notes)


def grounding_lines(result: GroundingResult) -> list[str]:
    """The check as printed beside BLEU/METEOR."""
    s = result.scores

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.0f}%"

    return [f"grounding ({result.n} held-out reports regenerated; verdict: {result.verdict}):",
            f"  own slide      states a grade {pct(s['original']['grade_stated_rate'])}, the true grade "
            f"{pct(s['original']['agrees_with_own_grade'])}; equal to the predictions given "
            f"{pct(s['original'].get('matches_predictions'))}",
            f"  swapped slide  states the donor's grade {pct(s['swapped']['agrees_with_donor_grade'])}, the own grade "
            f"{pct(s['swapped']['agrees_with_own_grade'])}; text changed {pct(s['swapped']['text_changed'])}, "
            f"grade changed {pct(s['swapped']['grade_changed'])}, risk changed {pct(s['swapped']['risk_changed'])}",
            f"  blank tiles    text changed {pct(s['blank']['text_changed'])}, grade changed "
            f"{pct(s['blank']['grade_changed'])}, still the true grade {pct(s['blank']['agrees_with_own_grade'])}"]
