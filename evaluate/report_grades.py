"""Grade and prognosis read from free report text, and scored against a clinical table.

A report states grade in many systems; each mention is read into one of three scales:
- "G": G1-G4 and "grade 1-4 / I-IV" (generic, Fuhrman, ISUP, WHO CNS, Nottingham / Elston grade), the
  differentiation words (well → G1, moderately → G2, poorly → G3, undifferentiated → G4), and a Nottingham
  score (3-5 → G1, 6-7 → G2, 8-9 → G3);
- "high-low": "high grade" / "low grade" (not high-grade dysplasia or PIN, which are not the tumour's grade);
- "gleason": the grade group (1-5), from "grade group N" or "Gleason a+b(=s)"; a bare score 7 has no group.
A range ("grade 2-3", "moderately to poorly differentiated") reads as its higher grade, as pathologists
grade a tumour by its worst part; a mention negated in its own clause ("not poorly differentiated",
"negative for high-grade") is dropped. A report's grade on a scale is the highest grade it states there.

Scoring follows the clinical table: a cancer type is scored (accuracy, QWK) on the scale its table grades
use (TCGA-CDR: G1-G4 for KIRC, LGG, ..., high/low for BLCA); a type whose table holds no grade (PRAD, BRCA,
GBM, COAD in TCGA-CDR) gets coverage only: the share of reports that state a grade at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
from sklearn.metrics import cohen_kappa_score

G, HIGH_LOW, GLEASON = "G", "high-low", "gleason"
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
_NUM = r"(?:[1-4]|iv|i{1,3})"
_RANGE = rf"(?:\s*(?:-|–|/|to|or|and)\s*(?:grade\s*)?(?P<to>{_NUM}))?"
_LEVEL_WORD = {"well": 1, "moderately": 2, "moderate": 2, "poorly": 3, "poor": 3}
_NOT_TUMOUR_GRADE = r"(?!\s+(?:prostatic\s+)?(?:intraepithelial|dysplasia|pin\b|squamous\s+intraepithelial|sil\b))"
_NEGATION = re.compile(r"\b(?:not|no|without|negative\s+for|absence\s+of|absent|free\s+of|rather\s+than|nor)\b"
                       r"(?:\W+\w+){0,3}\W*$", re.IGNORECASE)

# In priority order: a span claimed by an earlier pattern is not read again by a later one.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("gleason_sum", re.compile(r"\bgleason(?:\s+(?:score|sum|grade|pattern))?\s*[:=]?\s*(?P<a>[1-5])\s*\+\s*(?P<b>[1-5])"
                               r"(?:\s*=\s*(?P<s>\d{1,2}))?", re.IGNORECASE)),
    ("gleason_score", re.compile(r"\bgleason\s+(?:score|sum)\s*[:=]?\s*(?:of\s+)?(?P<s>\d{1,2})\b", re.IGNORECASE)),
    ("grade_group", re.compile(r"\b(?:isup\s+)?grade\s+group\s*[:=]?\s*(?P<v>[1-5])\b", re.IGNORECASE)),
    ("nottingham_score", re.compile(r"\b(?:nottingham|elston|bloom|sbr|mbr)\b[^.;\n]{0,40}?\bscore\s*[:=]?\s*(?:of\s+)?"
                                    r"(?:[1-3]\s*\+\s*[1-3]\s*\+\s*[1-3]\s*=\s*)?(?P<s>[3-9])\b", re.IGNORECASE)),
    ("g_number", re.compile(r"\bG(?P<v>[1-4])(?:\s*[-–/]\s*G?(?P<to>[1-4]))?\b")),
    ("grade_number", re.compile(rf"\bgrade\s*[:=]?\s*(?:of\s+)?(?P<v>{_NUM}){_RANGE}\b(?!\s*(?:\+|cm|mm))",
                                re.IGNORECASE)),
    ("differentiated", re.compile(r"\b(?P<w>well|moderately|moderate|poorly|poor)(?:\s*(?:-|–|/|to|and|or)\s*"
                                  r"(?P<w2>well|moderately|moderate|poorly|poor))?[\s-]+differentiated\b", re.IGNORECASE)),
    ("undifferentiated", re.compile(r"\bundifferentiated\b", re.IGNORECASE)),
    ("high_low", re.compile(rf"\b(?P<hl>high|low)[\s-]+grade\b{_NOT_TUMOUR_GRADE}", re.IGNORECASE)),
    ("grade_high_low", re.compile(r"\bgrade\s*[:=]\s*(?P<hl>high|low)\b", re.IGNORECASE)),
]

_RISK_PATTERNS = [
    (re.compile(r"\b(?P<r>high|intermediate|low)[\s-]+risk\b", re.IGNORECASE), None),
    (re.compile(r"\b(?:poor|unfavou?rable|dismal|adverse)\s+prognosis\b", re.IGNORECASE), "high"),
    (re.compile(r"\bintermediate\s+prognosis\b", re.IGNORECASE), "intermediate"),
    (re.compile(r"\b(?:good|favou?rable|excellent)\s+prognosis\b", re.IGNORECASE), "low"),
    (re.compile(r"\bprognosis\s*[:=]\s*(?P<r>high|intermediate|low)\b", re.IGNORECASE), None),
]
RISK_LEVEL = {"low": 0, "intermediate": 1, "high": 2}


@dataclass(frozen=True)
class GradeMention:
    scale: str  # G, high-low or gleason
    value: int | str  # 1-4 (G), 1-5 (gleason grade group), "High Grade" / "Low Grade"
    text: str  # the words read, as written


def _number(token: str) -> int:
    return int(token) if token.isdigit() else _ROMAN[token.lower()]


def _gleason_group(a: int, b: int) -> int:
    total = a + b
    return 1 if total <= 6 else (2 if (a, b) == (3, 4) else 3) if total == 7 else 4 if total == 8 else 5


def _read(kind: str, m: re.Match[str]) -> GradeMention | None:
    text = m.group(0)
    if kind == "gleason_sum":
        return GradeMention(GLEASON, _gleason_group(int(m["a"]), int(m["b"])), text)
    if kind == "gleason_score":
        score = int(m["s"])
        group = {6: 1, 8: 4, 9: 5, 10: 5}.get(score)
        return GradeMention(GLEASON, group, text) if group else None
    if kind == "grade_group":
        return GradeMention(GLEASON, int(m["v"]), text)
    if kind == "nottingham_score":
        score = int(m["s"])
        return GradeMention(G, 1 if score <= 5 else 2 if score <= 7 else 3, text)
    if kind in ("g_number", "grade_number"):
        values = [_number(m["v"])] + ([_number(m["to"])] if m["to"] else [])
        return GradeMention(G, max(values), text)
    if kind == "differentiated":
        levels = [_LEVEL_WORD[m["w"].lower()]] + ([_LEVEL_WORD[m["w2"].lower()]] if m["w2"] else [])
        return GradeMention(G, max(levels), text)
    if kind == "undifferentiated":
        return GradeMention(G, 4, text)
    return GradeMention(HIGH_LOW, f"{m['hl'].capitalize()} Grade", text)


def _negated(text: str, start: int) -> bool:
    clause = re.split(r"[.;:,\n(]", text[:start])[-1]
    return bool(_NEGATION.search(clause))


def grade_mentions(text: str) -> list[GradeMention]:
    """Every grade the text states, in the order of the patterns' priority; negated mentions left out."""
    claimed: list[tuple[int, int]] = []
    found = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            if any(m.start() < end and start < m.end() for start, end in claimed):
                continue
            claimed.append(m.span())
            if _negated(text, m.start()):
                continue
            mention = _read(kind, m)
            if mention is not None:
                found.append(mention)
    return found


def stated_grade(text: str, scale: str = G) -> int | str | None:
    """The highest grade the text states on `scale` (G: 1-4; high-low: 'High Grade' / 'Low Grade'; gleason:
    grade group 1-5), or None."""
    values = [m.value for m in grade_mentions(text) if m.scale == scale]
    if not values:
        return None
    if scale == HIGH_LOW:
        return "High Grade" if "High Grade" in values else "Low Grade"
    return max(int(v) for v in values)


def states_a_grade(text: str) -> bool:
    return bool(grade_mentions(text))


def stated_prognosis(text: str) -> str | None:
    """'high' | 'intermediate' | 'low' risk as the text states it (the worst stated), or None."""
    found = []
    for pattern, fixed in _RISK_PATTERNS:
        for m in pattern.finditer(text):
            if not _negated(text, m.start()):
                found.append(fixed or m["r"].lower())
    return max(found, key=RISK_LEVEL.__getitem__) if found else None


def table_scale(grade: str | None) -> str | None:
    """The scale of a clinical table's grade: 'G2' → G, 'High Grade' → high-low."""
    if not grade:
        return None
    return G if re.fullmatch(r"G[1-4]", grade) else HIGH_LOW


def table_value(grade: str) -> int | str:
    return int(grade[1]) if table_scale(grade) == G else grade


def score_grades_against_table(texts: Mapping[str, str], patient_of: Mapping[str, str],
                               grades: Mapping[str, str | None], cancer_types: Mapping[str, str | None]
                               ) -> dict[str, Any]:
    """Grade stated in each text vs the clinical table, per cancer type.

    `texts`: {report id: text}; `patient_of`: {report id: patient}; `grades` and `cancer_types`: the table's
    {patient: grade ('G1'..'G4', 'High Grade'/'Low Grade' or None)} and {patient: type}. A type is scored on
    the scale of its table grades; a type with no table grade gets coverage only.
    """
    by_type: dict[str, list[str]] = {}
    for key in texts:
        patient = patient_of.get(key)
        if patient is None or patient not in cancer_types:
            continue
        by_type.setdefault(cancer_types[patient] or "unknown", []).append(key)
    table_types: dict[str, str] = {}
    for patient, grade in grades.items():
        scale = table_scale(grade)
        if scale:
            table_types.setdefault(cancer_types.get(patient) or "unknown", scale)
    out: dict[str, Any] = {}
    for cancer_type, keys in sorted(by_type.items()):
        entry: dict[str, Any] = {"reports": len(keys),
                                 "coverage": float(np.mean([states_a_grade(texts[k]) for k in keys]))}
        scale = table_types.get(cancer_type)
        entry["table_grade_scale"] = scale
        if scale is None:
            entry["scored"] = "coverage only: the clinical table holds no grade for this cancer type"
            out[cancer_type] = entry
            continue
        pairs = []
        for k in keys:
            truth = grades.get(patient_of[k])
            said = stated_grade(texts[k], scale)
            if truth and table_scale(truth) == scale and said is not None:
                pairs.append((table_value(truth), said))
        entry["scored"] = len(pairs)
        entry["with_table_grade"] = sum(1 for k in keys if table_scale(grades.get(patient_of[k])) == scale)
        if pairs:
            entry["accuracy"] = float(np.mean([t == s for t, s in pairs]))
            order = [1, 2, 3, 4] if scale == G else ["Low Grade", "High Grade"]
            truth_idx = [order.index(t) for t, _ in pairs]
            said_idx = [order.index(s) for _, s in pairs]
            if len(set(truth_idx) | set(said_idx)) > 1:
                entry["qwk"] = float(cohen_kappa_score(truth_idx, said_idx, weights="quadratic",
                                                       labels=list(range(len(order)))))
        out[cancer_type] = entry
    return out


def coverage(texts: Iterable[str]) -> float | None:
    values = [states_a_grade(t) for t in texts]
    return float(np.mean(values)) if values else None
