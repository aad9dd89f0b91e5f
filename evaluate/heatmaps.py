"""`evaluate survival|grade --heatmaps SLIDE ...`: one attention PNG per slide, each drawn with the model of the
fold that held the slide's patient out, so the picture shows what the head saw in a patient it was tested on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError
from slidecache.heads.heatmap import draw_heatmap
from slidecache.heads.mil import MILModel
from store.embedding_store import EmbeddingStore


def draw_heatmaps(store: EmbeddingStore, slide_ids: Sequence[str], folds: Mapping[str, int],
                  models: Mapping[int, MILModel], out_dir: str | Path) -> list[dict[str, Any]]:
    """One PNG per slide, each drawn with the model of the fold holding the slide's patient out."""
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
        drawn.append(draw_heatmap(models[fold], slide, out / f"heatmap_{slide_id}.png",
                                  f"{slide_id} — attention of the fold-{fold} head (patient held out)") | {"fold": fold})
    return drawn
