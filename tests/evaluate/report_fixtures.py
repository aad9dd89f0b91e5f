"""A store holding the slides of the report fixtures (tests/fixtures/reports), embeddings that carry each
slide's cancer type, so the nearest-report baseline has something to find."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.evaluate.helpers import COLUMNS, DIM, TILE
from tests.store.helpers import spec

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "reports"
HISTGEN_JSON = FIXTURES / "histgen_annotation.json"
REPORTS_CSV = FIXTURES / "tcga_reports.csv"
CLINICAL = FIXTURES / "clinical.tsv"


def fixture_slides() -> dict[str, str]:
    """{slide id: set} as HistGen's JSON gives them."""
    data = json.loads(HISTGEN_JSON.read_text())
    return {e["id"]: split for split, entries in data.items() for e in entries}


def report_store(root: Path, leave_out: tuple[str, ...] = ()) -> str:
    rng = np.random.default_rng(0)
    directions = {t: rng.normal(size=DIM) for t in ("F0", "F1", "F2")}  # the fixture's site code = its type
    url = str(root / "report_store")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(dim=DIM))
    for slide_id in sorted(fixture_slides()):
        if slide_id in leave_out:
            continue
        n = int(rng.integers(6, 14))
        emb = 2.0 * directions[slide_id[5:7]] + 0.5 * rng.normal(size=(n, DIM))
        coords = np.stack([np.arange(n) % COLUMNS, np.arange(n) // COLUMNS], 1).astype(np.int64) * TILE
        attrs = {"patient_id": slide_id[:12], "tile_px_level0": TILE,
                 "level0_size": [COLUMNS * TILE, int(coords[:, 1].max() + TILE)]}
        with store.write_slide(slide_id, attrs) as w:
            w.append(coords, np.ones(n), emb.astype(np.float16))
            w.commit()
    return url
