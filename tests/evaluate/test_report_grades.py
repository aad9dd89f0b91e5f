"""Grade and prognosis read from free text: a table of sentences worked by hand (systems, ranges,
negations), scoring per cancer type against a clinical table, and properties over generated text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluate.report_grades import (
    GLEASON,
    HIGH_LOW,
    G,
    grade_mentions,
    score_grades_against_table,
    stated_grade,
    stated_prognosis,
)

# (sentence, scale, grade it states on that scale): worked by hand
SENTENCES = [
    ("Clear cell renal cell carcinoma, Fuhrman nuclear grade 3.", G, 3),
    ("ISUP/WHO grade 2 of 4.", G, 2),
    ("Tumour grade: G2.", G, 2),
    ("Histologic grade: G2-G3.", G, 3),
    ("Nuclear grade 2-3.", G, 3),
    ("grade II-III (Fuhrman)", G, 3),
    ("Oligodendroglioma, CNS WHO grade 3.", G, 3),
    ("Astrocytoma, IDH-mutant, WHO grade II.", G, 2),
    ("Invasive ductal carcinoma, Nottingham histologic grade 2 (score 3+2+2=7).", G, 2),
    ("Nottingham combined histologic score: 8.", G, 3),
    ("Elston grade III.", G, 3),
    ("Moderately differentiated adenocarcinoma.", G, 2),
    ("Moderately to poorly differentiated adenocarcinoma.", G, 3),
    ("Well-differentiated squamous cell carcinoma.", G, 1),
    ("Poorly differentiated carcinoma.", G, 3),
    ("Undifferentiated carcinoma.", G, 4),
    ("The tumour is not poorly differentiated; it is moderately differentiated.", G, 2),
    ("Adenocarcinoma, not poorly differentiated.", G, None),
    ("No grade can be assigned (GX).", G, None),
    ("Tumour size 3 cm, stage pT2.", G, None),
    ("High-grade papillary urothelial carcinoma.", HIGH_LOW, "High Grade"),
    ("Low grade urothelial carcinoma, non-invasive.", HIGH_LOW, "Low Grade"),
    ("Negative for high-grade dysplasia; low-grade carcinoma.", HIGH_LOW, "Low Grade"),
    ("Negative for high-grade urothelial carcinoma.", HIGH_LOW, None),
    ("High-grade prostatic intraepithelial neoplasia (PIN) present.", HIGH_LOW, None),
    ("Prostatic adenocarcinoma, Gleason score 3+4=7, grade group 2.", GLEASON, 2),
    ("Gleason 4 + 3 = 7.", GLEASON, 3),
    ("Gleason score 9 (4+5).", GLEASON, 5),
    ("Gleason score 8.", GLEASON, 4),
    ("Gleason score 7.", GLEASON, None),  # 3+4 or 4+3: no grade group
    ("ISUP grade group 4.", GLEASON, 4),
]


@pytest.mark.parametrize("text, scale, expected", SENTENCES)
def test_sentences_worked_by_hand(text, scale, expected):
    assert stated_grade(text, scale) == expected, grade_mentions(text)


def test_gleason_is_not_read_as_a_g_grade():
    assert stated_grade("Gleason score 3+4=7, grade group 2.", G) is None


@pytest.mark.parametrize("text, risk", [
    ("Prognosis: high risk.", "high"),
    ("Features suggest a poor prognosis.", "high"),
    ("Overall favourable prognosis.", "low"),
    ("Favorable prognosis.", "low"),
    ("Low-risk disease.", "low"),
    ("This is not high risk.", None),
    ("Low risk by stage, but a poor prognosis given the margin.", "high"),
    ("No prognosis stated.", None),
])
def test_prognosis(text, risk):
    assert stated_prognosis(text) == risk


def test_scored_per_cancer_type_on_the_tables_scale():
    texts = {"k1": "Fuhrman grade 2.", "k2": "Fuhrman grade 4.", "k3": "no grade here",
             "b1": "High-grade urothelial carcinoma.", "b2": "low grade carcinoma",
             "p1": "Gleason score 3+4=7.", "p2": "Adenocarcinoma."}
    patient_of = {k: k.upper() for k in texts}
    grades = {"K1": "G2", "K2": "G3", "K3": "G1", "B1": "High Grade", "B2": "High Grade", "P1": None, "P2": None}
    types = {"K1": "KIRC", "K2": "KIRC", "K3": "KIRC", "B1": "BLCA", "B2": "BLCA", "P1": "PRAD", "P2": "PRAD"}
    out = score_grades_against_table(texts, patient_of, grades, types)
    assert out["KIRC"]["coverage"] == pytest.approx(2 / 3) and out["KIRC"]["scored"] == 2
    assert out["KIRC"]["accuracy"] == 0.5 and out["KIRC"]["table_grade_scale"] == G
    assert out["BLCA"]["accuracy"] == 0.5 and out["BLCA"]["table_grade_scale"] == HIGH_LOW
    assert out["PRAD"]["coverage"] == 0.5 and "accuracy" not in out["PRAD"]
    assert out["PRAD"]["scored"].startswith("coverage only")


def test_qwk_counts_distance():
    texts = {f"r{i}": f"grade {said}" for i, said in enumerate([1, 2, 3, 4, 1, 2, 3, 4])}
    near = score_grades_against_table(texts, {k: k for k in texts},
                                      {f"r{i}": f"G{g}" for i, g in enumerate([1, 2, 3, 3, 2, 2, 3, 4])},
                                      {k: "KIRC" for k in texts})["KIRC"]
    far = score_grades_against_table(texts, {k: k for k in texts},
                                     {f"r{i}": f"G{g}" for i, g in enumerate([4, 2, 3, 4, 1, 2, 3, 1])},
                                     {k: "KIRC" for k in texts})["KIRC"]
    assert near["accuracy"] == far["accuracy"] == 0.75 and near["qwk"] > far["qwk"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_reads_without_error_and_within_scale(text):
    for mention in grade_mentions(text):
        assert (mention.scale == G and mention.value in (1, 2, 3, 4)) or \
               (mention.scale == GLEASON and mention.value in (1, 2, 3, 4, 5)) or \
               (mention.scale == HIGH_LOW and mention.value in ("High Grade", "Low Grade"))
    assert stated_prognosis(text) in (None, "low", "intermediate", "high")


PHRASES = ["poorly differentiated", "grade 3", "G2", "high-grade", "Gleason score 4+4=8", "Fuhrman grade 2",
           "WHO grade II", "moderately to poorly differentiated", "grade group 3", "Nottingham score 7"]
WORDS = st.sampled_from(["the", "tumour", "shows", "carcinoma", "evidence", "of", "features", "and"])


@settings(max_examples=200, deadline=None)
@given(st.lists(WORDS, max_size=6), st.sampled_from(["not", "no", "negative for", "without", "no evidence of"]),
       st.sampled_from(PHRASES))
def test_a_negated_mention_is_never_read(before, negation, phrase):
    lead = " ".join(before)
    assert grade_mentions(f"{lead} {phrase}".strip()), phrase  # read when stated
    assert not grade_mentions(f"{lead} {negation} {phrase}".strip())  # dropped when negated in its clause
    assert grade_mentions(f"{lead} {negation} necrosis. {phrase}".strip())  # another sentence is not negated
