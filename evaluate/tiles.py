"""What the MIL heads of an evaluation read and draw: one bag of tiles per patient (its size logged), and
attention heatmaps of chosen slides, each by the head of the fold that held the slide's patient out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from evaluate.cohort import refuse_tiles_with_set
from evaluate.features import PatientData
from slidecache.errors import EvaluationError
from slidecache.heads.saved import check_savable
from store.embedding_store import EmbeddingStore


class HeadSettings(Protocol):
    """What a survival or grade evaluation's settings say about the head and what it reads."""

    head: str
    slide_embeddings: str | None
    save_head: str | None
    heatmaps: tuple[str, ...]
    max_tiles: int
    seed: int

    @property
    def tiles(self) -> bool: ...


def bags_if_needed(store: EmbeddingStore, data: PatientData, settings: HeadSettings, task: str,
                   bag_heads: Iterable[str], log: Callable[[str], None]) -> np.ndarray | None:
    """Refuse settings that cannot work before anything is fitted; then the tile bags a MIL head reads (None for
    a head on slide vectors)."""
    if settings.slide_embeddings:
        refuse_tiles_with_set(settings.slide_embeddings, settings.head, settings.tiles, settings.save_head,
                              settings.heatmaps)
    if settings.heatmaps and not settings.tiles:
        raise EvaluationError(f"--heatmaps draws ABMIL attention, or another MIL head's: use one of --head "
                              f"{'|'.join(bag_heads)}")
    if settings.save_head:
        check_savable(task, settings.head)
    return read_bags(store, data, settings.max_tiles, settings.seed, log) if settings.tiles else None


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
