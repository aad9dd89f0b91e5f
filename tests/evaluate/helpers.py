"""A store and clinical table with a planted risk signal, written through the real store API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store import EmbeddingStore
from tests.store.helpers import spec

DIM = 32


def planted_cohort(root: Path, patients: int = 120, seed: int = 0, signal: float = 2.5, slides_per_patient: int = 1,
                   permute: bool = False) -> tuple[str, Path]:
    """Embeddings carry a known risk direction; survival times follow exp(signal * risk) hazards."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    risk = rng.normal(size=patients)
    url = str(root / "store")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec(dim=DIM))
    for p in range(patients):
        for s in range(slides_per_patient):
            n = int(rng.integers(8, 30))
            emb = risk[p] * direction + 0.8 * rng.normal(size=(n, DIM))
            coords = np.stack([np.arange(n) * 448, np.zeros(n)], 1).astype(np.int64)
            with store.write_slide(f"PT{p:04d}-S{s}", {"patient_id": f"PT{p:04d}"}) as w:
                w.append(coords, np.ones(n), emb.astype(np.float16))
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
