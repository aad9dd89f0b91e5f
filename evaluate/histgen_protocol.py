"""The HistGen WSI-report benchmark's scoring protocol (Guo et al., MICCAI 2024), on report text alone.

Learnt from their public code (dddavid4real/HistGen: the `wsi_report` cleaning of modules/tokenizers.py,
the reference decoding of modules/tester_AllinOne.py, modules/metrics.py), written here afresh:

1. Cleaning: newlines become spaces; runs of "__", double spaces and ".." are squeezed by a fixed number
   of passes; list numbering ("1. ", ". 2. " ...) is dropped; the text is lower-cased and split at ". ";
   in each sentence quotes, slashes and backslashes go, then the characters of their character class
   `[.,?;*!%^&_+():-\\[\\]{}]` (where `:-\\[` is the range ':' to '[', so ';<=>?@' go too, and '-' stays);
   sentences are joined with " . " and a final " ." is added. Words are the whitespace-separated tokens.
2. Vocabulary: the words seen at least `threshold` times (their script: 10) in the training reports,
   plus `<unk>`; any other word reads as `<unk>`.
3. Length: a report is cut to its first `max_seq_length - 1` words (their script: 100; one position goes
   to the start token).
4. Metrics: BLEU-1..4, METEOR and ROUGE-L from pycocoevalcap on those strings, one reference per report,
   no PTB tokenizer (their tester passes the decoded strings as they are).

Predictions go through the same steps as references, as a HistGen model's output is bounded by the same
vocabulary and length. References are the raw report texts; from predictions, the grade and prognosis
sentences our annotations append ("Tumour grade: G2. Prognosis: high risk." at the end) are removed first,
so the score is of the report text.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

import numpy as np

from slidecache.errors import EvaluationError

THRESHOLD = 10
MAX_SEQ_LENGTH = 100
UNKNOWN = "<unk>"
# Their character class, spelled out: the listed punctuation plus the range ':' .. '[' (0x3A-0x5B).
_DROPPED = set(".,?;*!%^&_+()]{}") | {chr(c) for c in range(ord(":"), ord("[") + 1)} | set('"/\\\'')
_DROP_TABLE = str.maketrans({c: None for c in _DROPPED})
# (old, new, passes): each pass is one str.replace over the whole text, as theirs.
_SQUEEZES = (("\n", " ", 1), ("__", "_", 7), ("  ", " ", 6), ("..", ".", 8))
_LIST_NUMBERS = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
                 (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))
# The sentences train.annotations appends, exactly as it writes them, at the very end of a generated text.
OUR_SENTENCES = re.compile(r"(?:\s*Tumour grade: (?:G[1-4]|High Grade|Low Grade)\.)?(?:\s*Prognosis: (?:high|low) risk\.)?$")


def clean_report(text: str) -> str:
    for old, new, passes in _SQUEEZES:
        for _ in range(passes):
            text = text.replace(old, new)
    for old, new in _LIST_NUMBERS:
        text = text.replace(old, new)
    sentences = text.strip().lower().split(". ")
    return " . ".join(s.strip().lower().translate(_DROP_TABLE) for s in sentences) + " ."


def report_words(text: str) -> list[str]:
    return clean_report(text).split()


def without_our_sentences(text: str) -> str:
    """A generated text without the grade / prognosis sentences our annotations append at its end (only
    those, as we write them: a report's own "Tumor grade: ..." stays); otherwise unchanged."""
    return OUR_SENTENCES.sub("", text, count=1)


@dataclass(frozen=True)
class Vocabulary:
    words: frozenset[str]
    threshold: int
    max_seq_length: int

    @classmethod
    def from_training(cls, reports: Iterable[str], threshold: int = THRESHOLD,
                      max_seq_length: int = MAX_SEQ_LENGTH) -> Vocabulary:
        counts = Counter(w for r in reports for w in report_words(r))
        if not counts:
            raise EvaluationError("the HistGen protocol needs the training reports (its vocabulary comes from them): none given")
        return cls(frozenset(w for w, n in counts.items() if n >= threshold), threshold, max_seq_length)

    def as_scored(self, text: str) -> str:
        """The string their tester scores: cleaned, rare words as <unk>, cut to max_seq_length - 1 words."""
        words = [w if w in self.words else UNKNOWN for w in report_words(text)]
        return " ".join(words[: self.max_seq_length - 1])


@lru_cache(maxsize=1)
def meteor_scorer():
    """One METEOR JVM (~10-13 s to start, its paraphrase table loaded) for every scoring in this process."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L (pycocoevalcap) of already-prepared strings, one reference each."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    keys = sorted(predictions)
    gts = {k: [references[k]] for k in keys}
    res = {k: [predictions[k]] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    if shutil.which("java"):
        scores["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    return scores


def histgen_scores(predictions: Mapping[str, str], references: Mapping[str, str], vocabulary: Vocabulary
                   ) -> dict[str, float]:
    """The benchmark's numbers for `predictions` against `references` (both {id: raw text})."""
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise EvaluationError(f"{len(missing)} predictions have no reference report (e.g. {missing[:3]})")
    prepared_refs = {k: vocabulary.as_scored(references[k]) for k in predictions}
    prepared_preds = {k: vocabulary.as_scored(without_our_sentences(v)) for k, v in predictions.items()}
    return caption_metrics(prepared_preds, prepared_refs)


def most_frequent_report(training: Mapping[str, str]) -> str:
    """The training report whose cleaned text occurs most often; among equals (all distinct, typically),
    the one whose words are most common across the training reports (highest mean document frequency)."""
    cleaned = {k: clean_report(v) for k, v in training.items()}
    counts = Counter(cleaned.values())
    top = max(counts.values())
    candidates = sorted(k for k, c in cleaned.items() if counts[c] == top)
    if len(candidates) == 1:
        return training[candidates[0]]
    document_frequency = Counter(w for text in set(cleaned.values()) for w in set(text.split()))

    def commonness(key: str) -> tuple[float, str]:
        words = cleaned[key].split()
        return (float(np.mean([document_frequency[w] for w in words])) if words else 0.0, key)

    return training[max(candidates, key=commonness)]


def nearest_training_reports(test_vectors: Mapping[str, np.ndarray], train_vectors: Mapping[str, np.ndarray],
                             training: Mapping[str, str]) -> dict[str, str]:
    """For each test slide, the report of the training slide nearest by cosine similarity of pooled embeddings."""
    train_keys = sorted(k for k in train_vectors if k in training)
    if not train_keys:
        raise EvaluationError("no training slide has both a pooled embedding and a report: no retrieval baseline")
    bank = np.stack([train_vectors[k] for k in train_keys]).astype(np.float64)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-12)
    out = {}
    for key, vector in test_vectors.items():
        v = np.asarray(vector, dtype=np.float64)
        similarity = bank @ (v / max(np.linalg.norm(v), 1e-12))
        out[key] = training[train_keys[int(np.argmax(similarity))]]
    return out
