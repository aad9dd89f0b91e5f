"""Attention heatmaps from the cache alone: every tile's attention under a MIL head (ABMIL, TransMIL, CLAM-SB,
DSMIL) drawn over the stored thumbnail at the stored coordinates (CLAM's picture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slidecache.heads.mil import MILModel
from slidecache.heads.slide_tiles import SlideTiles

CANVAS_LONG_SIDE = 1024  # px, when the slide has no stored thumbnail


def tile_scores(model: MILModel, slide: SlideTiles) -> np.ndarray:
    """A separable network's scores are read block by block; TransMIL's and DSMIL's need the slide as one bag."""
    if not model.network.separable:
        return model.tile_attention(np.concatenate([slide.embeddings(rows) for rows in slide.row_blocks()]))
    return np.concatenate([model.tile_attention(slide.embeddings(rows)) for rows in slide.row_blocks()])


def _tile_size_level0(slide: SlideTiles, coords: np.ndarray) -> float:
    if "tile_px_level0" in slide.attrs:
        return float(slide.attrs["tile_px_level0"])
    steps = np.diff(np.unique(coords[:, 0]))
    return float(steps.min()) if len(steps) else 256.0  # imported stores may lack it: the grid step


def attention_overlay(rgb: np.ndarray, coords: np.ndarray, scores: np.ndarray, tile: float, downsample: float) -> np.ndarray:
    """The thumbnail (float RGB in 0..1) with each tile's square tinted by its attention percentile (jet)."""
    import matplotlib

    # Percentile ranks, as CLAM: raw attention is heavy-tailed and would paint one tile and nothing else.
    rank = scores.argsort().argsort() / max(len(scores) - 1, 1)
    colours = matplotlib.colormaps["jet"](rank)[:, :3]
    height, width = rgb.shape[:2]
    overlay = np.zeros((height, width, 3))
    covered = np.zeros((height, width), dtype=bool)
    for (x, y), colour in zip(coords / downsample, colours):
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1 = min(max(x0 + 1, int(np.ceil(x + tile / downsample))), width)
        y1 = min(max(y0 + 1, int(np.ceil(y + tile / downsample))), height)
        overlay[y0:y1, x0:x1] = colour
        covered[y0:y1, x0:x1] = True
    blended = rgb[..., :3] / 255.0
    blended[covered] = 0.55 * blended[covered] + 0.45 * overlay[covered]
    return blended


def draw_heatmap(model: MILModel, slide: SlideTiles, path: str | Path, title: str = "") -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = tile_scores(model, slide)
    coords = slide.coords().astype(np.float64)
    tile = _tile_size_level0(slide, coords)
    stored = slide.thumbnail()
    if stored is not None:
        rgb, _, downsample = stored
    else:
        extent = slide.attrs.get("level0_size") or (coords.max(0) + tile).tolist()
        downsample = max(extent) / CANVAS_LONG_SIDE
        rgb = np.full((int(np.ceil(extent[1] / downsample)), int(np.ceil(extent[0] / downsample)), 3), 255, np.uint8)
    blended = attention_overlay(rgb, coords, scores, tile, downsample)
    height, width = blended.shape[:2]
    fig, ax = plt.subplots(figsize=(7, 7 * height / max(width, 1) + 0.6), dpi=120)
    ax.imshow(blended)
    ax.set_axis_off()
    ax.set_title(title or slide.slide_id, fontsize=9)
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap="jet"), ax=ax, fraction=0.035, pad=0.02)
    bar.set_label("attention (percentile within slide)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    top = np.argsort(scores)[::-1][:5]
    return {"slide_id": slide.slide_id, "tiles": int(len(scores)), "png": str(path),
            "thumbnail": stored is not None, "top_tiles_level0_xy": coords[top].astype(int).tolist()}
