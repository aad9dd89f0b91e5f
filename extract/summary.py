"""What an extraction did to each slide of each store, and the table printed at its end."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum


class SlideStatus(StrEnum):
    """A slide's outcome in one store. A str: printed, compared and written as the bare word."""

    DONE = "done"
    EMPTY = "empty"  # planned, no tissue tile: committed with its reason
    SKIPPED = "skipped"  # complete in the store already
    OWNED = "owned"  # another live job writes it
    FAILED = "failed"
    FAILED_BEFORE = "failed-before"  # recorded as failed by an earlier run, not retried


FINISHED = (SlideStatus.DONE, SlideStatus.EMPTY, SlideStatus.FAILED)  # what the progress line counts as finished
WITHOUT_EMBEDDINGS = (SlideStatus.FAILED, SlideStatus.FAILED_BEFORE)  # because of an error


@dataclass
class SlideOutcome:
    slide_id: str
    status: SlideStatus
    tiles: int = 0
    seconds: float = 0.0
    reader: str = ""
    mpp: float | None = None
    error: str = ""
    node: str = ""  # the Ray node whose encoder wrote it
    store: str = ""  # which store, when the run fills several ("" for one)
    read_nodes: list[str] = dataclasses.field(default_factory=list)  # the Ray nodes its tiles were read on


@dataclass
class ExtractionSummary:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0  # the whole run
    pipeline_seconds: float = 0.0  # from the encoders being ready to the last commit (no model loading)
    chunk_reads: dict[str, int] = field(default_factory=dict)  # slide → chunks read for it (once for all stores)

    def for_store(self, label: str) -> ExtractionSummary:
        """The outcomes of one store of a several-store run."""
        return dataclasses.replace(self, outcomes=[o for o in self.outcomes if o.store == label])

    def count(self, status: SlideStatus) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def tiles(self) -> int:
        return sum(o.tiles for o in self.outcomes if o.status == SlideStatus.DONE)

    @property
    def failed(self) -> list[SlideOutcome]:
        """Slides without embeddings because of an error: in this run, or earlier and not retried."""
        return [o for o in self.outcomes if o.status in WITHOUT_EMBEDDINGS]

    def table(self) -> str:
        several = any(o.store for o in self.outcomes)
        # columns as wide as their longest entry: a TCGA slide id (60 characters) is never cut, nor is a status
        wide = max([len("slide"), *(len(o.slide_id) for o in self.outcomes)])
        store_wide = max([len("store"), *(len(o.store or "") for o in self.outcomes)])
        status_wide = max([len("status"), *(len(o.status) for o in self.outcomes)])
        store = f"{'store':<{store_wide}} " if several else ""
        rows = [f"{'slide':<{wide}} {store}{'status':<{status_wide}} {'tiles':>7} {'reader':<10} {'mpp':>7} "
                f"{'s':>7}  error"]
        for o in self.outcomes:
            mpp = f"{o.mpp:.3f}" if o.mpp else "-"
            # tiles written by this run: a slide it did not encode (skipped, owned, failed before) shows none
            tiles = str(o.tiles) if o.status in (SlideStatus.DONE, SlideStatus.EMPTY) or o.tiles else "-"
            store = f"{o.store or '':<{store_wide}} " if several else ""
            # the whole error: it names what to do, and a cut would drop that
            rows.append(f"{o.slide_id:<{wide}} {store}{o.status:<{status_wide}} {tiles:>7} {o.reader:<10} "
                        f"{mpp:>7} {o.seconds:>7.1f}  {o.error}".rstrip())
        if several:
            reads = sum(self.chunk_reads.values())
            rows.append(f"{_count(len(self.chunk_reads), 'slide')} read once for every store that lacked them: "
                        f"{_count(reads, 'reader task')}")
            rows += [f"{label}: {self.for_store(label).counts()}" for label in dict.fromkeys(o.store for o in self.outcomes)]
        else:
            rows.append(self.counts())
        rows.append(f"{_count(self.tiles, 'tile')} in {self.seconds:.1f} s "
                    f"({self.tiles / max(self.seconds, 1e-9):.1f} tiles/s; "
                    f"{self.tiles / max(self.pipeline_seconds, 1e-9):.1f} tiles/s once the encoders were loaded)")
        return "\n".join(rows)

    def counts(self) -> str:
        """How many slides ended how, the statuses no slide has left out."""
        words = {SlideStatus.DONE: "done", SlideStatus.EMPTY: "without tiles", SlideStatus.SKIPPED: "already complete",
                 SlideStatus.OWNED: "being written by another job", SlideStatus.FAILED: "failed",
                 SlideStatus.FAILED_BEFORE: "failed before and not retried"}
        parts = [f"{self.count(status)} {word}" for status, word in words.items()
                 if self.count(status) or status == SlideStatus.DONE]
        return f"{_count(len(self.outcomes), 'slide')}: " + ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
