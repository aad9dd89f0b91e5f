"""What a user must be told about a batch of generated reports before reading any score: how many are empty,
how many hold undecodable text (U+FFFD, what half a multi-byte token decodes to), and whether every slide got
the same report. `train.generate` prints these warnings and records them; `evaluate report` prints them and
refuses to score when every report is empty."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

REPLACEMENT_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class GenerationCheck:
    reports: int
    empty: int
    undecodable: int  # reports holding U+FFFD
    distinct: int  # distinct non-empty texts

    @property
    def all_empty(self) -> bool:
        return self.reports > 0 and self.empty == self.reports

    @property
    def all_identical(self) -> bool:
        return self.reports > 1 and self.empty == 0 and self.distinct == 1

    def warnings(self) -> list[str]:
        out = []
        if self.empty:
            out.append(f"{self.empty} of {self.reports} generated reports are empty")
        if self.undecodable:
            out.append(f"{self.undecodable} of {self.reports} generated reports contain undecodable text (U+FFFD): "
                       "the model emits byte tokens that do not form characters, a sign it has not learnt the words")
        if self.all_identical:
            out.append(f"all {self.reports} generated reports are identical: the model writes the same report whatever "
                       "the slide (the grounding check tells: python -m evaluate report ... --checkpoint RUN --store "
                       "STORE)")
        return out

    def as_dict(self) -> dict[str, int | list[str]]:
        return asdict(self) | {"warnings": self.warnings()}


def check_generations(texts: Sequence[str]) -> GenerationCheck:
    stripped = [t.strip() for t in texts]
    return GenerationCheck(reports=len(stripped), empty=sum(not t for t in stripped),
                           undecodable=sum(REPLACEMENT_CHARACTER in t for t in stripped),
                           distinct=len({t for t in stripped if t}))
