"""What the MIL heads of an evaluation read and draw: one bag of tiles per patient (its size logged), and
attention heatmaps of chosen slides, each by the head of the fold that held the slide's patient out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from evaluate.features import PatientData
from store.embedding_store import EmbeddingStore


def read_bags(store: EmbeddingStore, data: PatientData, max_tiles: int, seed: int,
              log: Callable[[str], None]) -> np.ndarray:
    from evaluate.abmil import load_bags  # torch: only when a MIL head runs

    bags = load_bags(store, data.slides, max_tiles, seed)
    tiles = sum(len(b) for b in bags)
    log(f"read {tiles:,} tiles from the store for {len(bags)} patients (at most {max_tiles} per patient)")
    return bags


def heatmap_slides(requested: Sequence[str], data: PatientData, scores: Mapping[str, float]) -> list[str]:
    """`auto` stands for the first slide of the held-out patients with the highest and the lowest score."""
    ranked = sorted(scores, key=scores.get)
    slides_of = dict(zip(data.patient_ids, data.slides))
    chosen: list[str] = []
    for item in requested:
        chosen += [slides_of[p][0] for p in (ranked[-1], ranked[0])] if item == "auto" else [item]
    return list(dict.fromkeys(chosen))


def draw_attention(store: EmbeddingStore, data: PatientData, requested: Sequence[str], folds: Mapping[str, int],
                   models: Mapping[int, Any], scores: Mapping[str, float], out: Path,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The PNGs in `out`, each logged as drawn; what each one shows, for metrics.json."""
    from evaluate.heatmaps import draw_heatmaps

    drawn = draw_heatmaps(store, heatmap_slides(requested, data, scores), folds, models, out)
    for d in drawn:
        log(f"  heatmap {d['png']} ({d['tiles']} tiles, fold {d['fold']}"
            f"{'' if d['thumbnail'] else ', no stored thumbnail: drawn on a blank canvas'})")
    return drawn
