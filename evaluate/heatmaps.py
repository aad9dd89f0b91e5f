"""`evaluate survival|grade --heatmaps SLIDE ...`: one PNG per slide, each drawn with the model of the fold that
held the slide's patient out, so the picture shows what the head saw in a patient it was tested on: a MIL head's
tile attention, or, for a head on pooled slide vectors, the occlusion of its tiles (its output with every tile
minus without the tile)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError
from slidecache.heads.heatmap import draw_heatmap, draw_occlusion, tile_size_level0
from slidecache.heads.occlusion import MAX_EVALUATIONS, occlusion_scores
from store.embedding_store import EmbeddingStore
from store.slide_view import SlideView


class Painter(Protocol):
    """Draws one slide with one fold's model into `path`; what it drew, for metrics.json."""

    def __call__(self, model: Any, slide: SlideView, path: Path, fold: int) -> dict[str, Any]: ...


def paint_attention(model: Any, slide: SlideView, path: Path, fold: int) -> dict[str, Any]:
    """A MIL head's tile attention (`model`: its MILModel)."""
    return draw_heatmap(model, slide, path, f"{slide.slide_id} — attention of the fold-{fold} head (patient held out)")


@dataclass(frozen=True)
class OcclusionTarget:
    """What a slide-vector head's occlusion measures: `quantity` names `output(model, x)`, one number per row."""

    quantity: str
    output: Callable[[Any, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PaintOcclusion:
    """A slide-vector head's occlusion: the patient vector pooled as the head's (`pooling`) over the patient's
    slides (`slides_of`: patient → slide ids, as the features averaged them)."""

    store: EmbeddingStore
    slides_of: Mapping[str, Sequence[str]]
    pooling: str
    target: OcclusionTarget
    head: str
    max_evaluations: int = MAX_EVALUATIONS

    def __call__(self, model: Any, slide: SlideView, path: Path, fold: int) -> dict[str, Any]:
        patient = patient_key(slide.patient_id)
        slide_ids = self.slides_of.get(patient, ())
        if slide.slide_id not in slide_ids:
            raise EvaluationError(f"--heatmaps: slide {slide.slide_id!r} is not among the slides its patient "
                                  f"{patient}'s vector was pooled from ({', '.join(slide_ids) or 'none'})")
        others = [self.store.slide(s) for s in slide_ids if s != slide.slide_id]
        occlusion = occlusion_scores(slide, others, self.pooling, lambda x: self.target.output(model, x),
                                     tile_size_level0(slide, slide.coords()), self.max_evaluations)
        what = "each tile" if occlusion.group_side == 1 else \
            f"{occlusion.group_side}x{occlusion.group_side}-tile groups"
        title = (f"{slide.slide_id} — occlusion ({what}) of the fold-{fold} {self.head} head\n"
                 f"on {self.pooling}-pooled tiles (patient held out)")
        return draw_occlusion(occlusion, slide, path, self.target.quantity, title) | {"pooling": self.pooling}


def draw_heatmaps(store: EmbeddingStore, slide_ids: Sequence[str], folds: Mapping[str, int],
                  models: Mapping[int, Any], out_dir: str | Path, paint: Painter = paint_attention
                  ) -> list[dict[str, Any]]:
    """One PNG per slide, each drawn by `paint` with the model of the fold holding the slide's patient out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for slide_id in slide_ids:
        if slide_id not in store:
            raise EvaluationError(f"--heatmaps: slide {slide_id!r} is not in the store {store.url}")
        slide = store.slide(slide_id)
        patient = patient_key(slide.patient_id)
        if folds.get(patient) not in models:
            raise EvaluationError(f"--heatmaps: slide {slide_id!r} (patient {patient}) was in no evaluated fold")
        fold = folds[patient]
        started = time.perf_counter()
        record = paint(models[fold], slide, out / f"heatmap_{slide_id}.png", fold) | {"fold": fold}
        drawn.append(record | {"seconds": round(time.perf_counter() - started, 2)})
    return drawn
