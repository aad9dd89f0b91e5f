"""What the heads of an evaluation read and draw: one bag of tiles per patient for a MIL head (its size logged),
and heatmaps of chosen slides, each by the head of the fold that held the slide's patient out: a MIL head's
attention, a slide-vector head's occlusion of tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from evaluate.cohort import refuse_tiles_with_set
from evaluate.features import PatientData
from evaluate.heatmaps import OcclusionTarget, Painter, PaintOcclusion, draw_heatmaps, paint_attention
from slidecache.errors import EvaluationError
from slidecache.heads.saved import check_savable
from store.embedding_store import EmbeddingStore


class HeadSettings(Protocol):
    """What a survival or grade evaluation's settings say about the head and what it reads."""

    head: str
    pooling: str  # what a slide-vector head's patient vectors pool the tiles with
    slide_embeddings: str | None
    save_head: str | None
    heatmaps: tuple[str, ...]
    max_tiles: int
    seed: int

    @property
    def tiles(self) -> bool: ...


def refuse_with_set(settings: HeadSettings) -> None:
    """What a head on a slide-embedding set's vectors cannot do, refused before anything is read."""
    if not settings.slide_embeddings:
        return
    name = settings.slide_embeddings
    refuse_tiles_with_set(name, settings.head, settings.tiles, settings.save_head)
    if settings.heatmaps:
        raise EvaluationError(
            f"--heatmaps draws a MIL head's tile attention or a pooled-tile head's occlusion of tiles; slide-embedding "
            f"set {name!r} holds one vector per slide from its slide encoder, so occluding a tile would need that "
            "encoder run again on the slide without it (the cache holds no such vectors): leave out --heatmaps, or "
            "drop --slide-embeddings and use --pooling mean|max|cls")


def bags_if_needed(store: EmbeddingStore, data: PatientData, settings: HeadSettings, task: str,
                   log: Callable[[str], None]) -> np.ndarray | None:
    """Refuse settings that cannot work before anything is fitted; then the tile bags a MIL head reads (None for
    a head on slide vectors)."""
    refuse_with_set(settings)
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


def draw_slide_heatmaps(store: EmbeddingStore, data: PatientData, requested: Sequence[str],
                        folds: Mapping[str, int], models: Mapping[int, Any], scores: Mapping[str, float], out: Path,
                        log: Callable[[str], None], paint: Painter) -> list[dict[str, Any]]:
    """The PNGs in `out`, each logged as drawn; what each one shows, for metrics.json."""
    drawn = draw_heatmaps(store, heatmap_slides(requested, data, scores), folds, models, out, paint)
    for d in drawn:
        how = f"{d['method']}, fold {d['fold']}"
        if d["method"] == "occlusion":
            how += f", {d['occluded']}, {d['evaluations']} head evaluations"
        log(f"  heatmap {d['png']} ({d['tiles']} tiles, {how}, {d['seconds']:.1f} s"
            f"{'' if d['thumbnail'] else ', no stored thumbnail: drawn on a blank canvas'})")
    return drawn


def heatmap_painter(store: EmbeddingStore, data: PatientData, settings: HeadSettings,
                    target: OcclusionTarget) -> Painter:
    """A MIL head's attention; a slide-vector head's occlusion of tiles, measured in `target`'s output."""
    if settings.tiles:
        return paint_attention
    return PaintOcclusion(store, dict(zip(data.patient_ids, data.slides)), settings.pooling, target, settings.head)
