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
        # columns as wide as their longest entry: a TCGA slide id (60 characters) is never cut
        wide = max([len("slide"), *(len(o.slide_id) for o in self.outcomes)])
        store_wide = max([len("store"), *(len(o.store or "") for o in self.outcomes)])
        store = f"{'store':<{store_wide}} " if several else ""
        rows = [f"{'slide':<{wide}} {store}{'status':<8} {'tiles':>7} {'reader':<10} {'mpp':>7} {'s':>7}  error"]
        for o in self.outcomes:
            mpp = f"{o.mpp:.3f}" if o.mpp else "-"
            store = f"{o.store or '':<{store_wide}} " if several else ""
            rows.append(f"{o.slide_id:<{wide}} {store}{o.status:<8} {o.tiles:>7} {o.reader:<10} {mpp:>7} "
                        f"{o.seconds:>7.1f}  {o.error[:120]}")
        if several:
            reads = sum(self.chunk_reads.values())
            rows.append(f"{len(self.chunk_reads)} slides read once for every store that lacked them: {reads} reader "
                        "tasks")
        rows.append(f"{self.count(SlideStatus.DONE)} done, {self.count(SlideStatus.EMPTY)} without tiles, "
                    f"{self.count(SlideStatus.SKIPPED)} already complete, {self.count(SlideStatus.OWNED)} being "
                    f"written by another job, {self.count(SlideStatus.FAILED)} failed, "
                    f"{self.count(SlideStatus.FAILED_BEFORE)} failed before and not retried; "
                    f"{self.tiles} tiles in "
                    f"{self.seconds:.1f} s ({self.tiles / max(self.seconds, 1e-9):.1f} tiles/s; "
                    f"{self.tiles / max(self.pipeline_seconds, 1e-9):.1f} tiles/s once the encoders were loaded)")
        return "\n".join(rows)
