"""A store and clinical table with a planted risk signal, written through the real store API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store import EmbeddingStore
from tests.store.helpers import spec

DIM = 32
TILE = 448  # level-0 px per tile
COLUMNS = 6  # tiles per row of the synthetic grid
THUMB_DOWNSAMPLE = 16.0


def planted_cohort(root: Path, patients: int = 120, seed: int = 0, signal: float = 2.5, slides_per_patient: int = 1,
                   permute: bool = False, thumbnails: bool = False, noise: float = 0.8, name: str = "store",
                   encoder: str = "test-encoder", shared_offset: float = 0.0, constant_dims: int = 0,
                   constant_tiles: bool = False, risk_levels: tuple[float, ...] | None = None) -> tuple[str, Path]:
    """Embeddings carry a known risk direction under `noise`; survival times follow exp(signal * risk)
    hazards. Tiles lie on a grid COLUMNS wide; `thumbnails` stores a plain pink picture per slide. The same
    seed with another noise (and name) is the same cohort seen by a better or worse encoder. As real encoders'
    vectors are: `shared_offset` added to every tile on the first 4 dimensions (a huge shared channel), the last
    `constant_dims` dimensions the same in every tile. `constant_tiles`: every tile of every slide identical
    (8 per slide), so the slides carry nothing. `risk_levels`: each patient's risk one of these values (+-0.1),
    so that no patient sits on a grade boundary."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    risk = rng.normal(size=patients)
    if risk_levels:
        risk = rng.choice(risk_levels, size=patients) + rng.uniform(-0.1, 0.1, size=patients)
    url = str(root / name)
    store_spec = spec(dim=DIM)
    store_spec["encoder"]["name"] = encoder
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=store_spec)
    for p in range(patients):
        for s in range(slides_per_patient):
            n = int(rng.integers(8, 30))
            emb = risk[p] * direction + noise * rng.normal(size=(n, DIM))
            emb[:, :4] += shared_offset
            if constant_dims:
                emb[:, DIM - constant_dims:] = 0.8
            if constant_tiles:
                n, emb = 8, np.full((8, DIM), 0.8)
            coords = np.stack([np.arange(n) % COLUMNS, np.arange(n) // COLUMNS], 1).astype(np.int64) * TILE
            size = [COLUMNS * TILE, (coords[:, 1].max() + TILE)]
            attrs = {"patient_id": f"PT{p:04d}", "tile_px_level0": TILE, "level0_size": [int(v) for v in size]}
            with store.write_slide(f"PT{p:04d}-S{s}", attrs) as w:
                w.append(coords, np.ones(n), emb.astype(np.float16))
                if thumbnails:
                    h, wd = int(np.ceil(size[1] / THUMB_DOWNSAMPLE)), int(np.ceil(size[0] / THUMB_DOWNSAMPLE))
                    w.set_thumbnail(np.full((h, wd, 3), (236, 200, 220), np.uint8), None, THUMB_DOWNSAMPLE)
                w.commit()
    hazard = 0.001 * np.exp(signal * risk)
    event_time = rng.exponential(1 / hazard)
    censor_time = rng.uniform(200, 3000, patients)
    time = np.minimum(event_time, censor_time).round(1)
    event = (event_time <= censor_time).astype(int)
    if permute:
        order = rng.permutation(patients)
        time, event = time[order], event[order]
    grades = np.digitize(risk, [-0.7, 0.0, 0.7]) + 1
    stages = ["Stage I", "Stage II", "Stage III", "Stage IV"]
    rows = ["patient_id,cancer_type,grade,age,stage,OS,OS.time"]
    rows += [f"PT{p:04d},DEMO,G{grades[p]},{50 + p % 30},{stages[grades[p] - 1]},{event[p]},{time[p]}" for p in range(patients)]
    table = root / "clinical.csv"
    table.write_text("\n".join(rows) + "\n")
    return url, table
