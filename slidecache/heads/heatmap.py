"""Heatmaps from the cache alone: a score per tile drawn over the stored thumbnail at the stored coordinates
(CLAM's picture): a MIL head's attention (ABMIL, TransMIL, CLAM-SB, DSMIL) in percentiles, or the signed
occlusion scores of a slide-vector head (slidecache/heads/occlusion.py) on a diverging scale centred on 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slidecache.heads.occlusion import Occlusion
from slidecache.heads.slide_tiles import SlideTiles

if TYPE_CHECKING:  # torch: only a MIL head's attention needs it, never an occlusion map
    from slidecache.heads.mil import MILModel

CANVAS_LONG_SIDE = 1024  # px, when the slide has no stored thumbnail


def tile_scores(model: MILModel, slide: SlideTiles) -> np.ndarray:
    """A separable network's scores are read block by block; TransMIL's and DSMIL's need the slide as one bag."""
    if not model.network.separable:
        return model.tile_attention(np.concatenate([slide.embeddings(rows) for rows in slide.row_blocks()]))
    return np.concatenate([model.tile_attention(slide.embeddings(rows)) for rows in slide.row_blocks()])


def tile_size_level0(slide: SlideTiles, coords: np.ndarray) -> float:
    if "tile_px_level0" in slide.attrs:
        return float(slide.attrs["tile_px_level0"])
    steps = np.diff(np.unique(coords[:, 0]))
    return float(steps.min()) if len(steps) else 256.0  # imported stores may lack it: the grid step


@dataclass(frozen=True)
class TileColours:
    """Each tile's colour, and the colour bar that reads them back."""

    rgb: np.ndarray  # (n, 3) in 0..1
    cmap: str
    vmin: float
    vmax: float
    label: str


def percentile_colours(scores: np.ndarray) -> TileColours:
    """Attention as CLAM draws it: percentile ranks in jet; raw attention is heavy-tailed and would paint one tile
    and nothing else."""
    import matplotlib

    rank = scores.argsort().argsort() / max(len(scores) - 1, 1)
    return TileColours(matplotlib.colormaps["jet"](rank)[:, :3], "jet", 0.0, 1.0, "attention (percentile within slide)")


def diverging_colours(scores: np.ndarray, label: str) -> TileColours:
    """Signed scores (occlusion) on a diverging map centred on 0: red raises the output, blue lowers it, white
    changes nothing; the scale is the largest change either way, so the colours read as values."""
    import matplotlib

    limit = float(np.abs(scores).max()) or 1.0
    return TileColours(matplotlib.colormaps["RdBu_r"](0.5 + 0.5 * scores / limit)[:, :3], "RdBu_r", -limit, limit,
                       label)


def paint_tiles(rgb: np.ndarray, coords: np.ndarray, colours: np.ndarray, tile: float, downsample: float) -> np.ndarray:
    """The thumbnail (float RGB in 0..1) with each tile's square tinted by its colour."""
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


def attention_overlay(rgb: np.ndarray, coords: np.ndarray, scores: np.ndarray, tile: float, downsample: float) -> np.ndarray:
    """The thumbnail (float RGB in 0..1) with each tile's square tinted by its attention percentile (jet)."""
    return paint_tiles(rgb, coords, percentile_colours(scores).rgb, tile, downsample)


def slide_canvas(slide: SlideTiles, coords: np.ndarray, tile: float) -> tuple[np.ndarray, float, bool]:
    """(uint8 RGB, level-0 px per pixel, whether it is the stored thumbnail): a blank canvas when none was stored."""
    stored = slide.thumbnail()
    if stored is not None:
        rgb, _, downsample = stored
        return rgb, downsample, True
    extent = slide.attrs.get("level0_size") or (coords.max(0) + tile).tolist()
    downsample = max(extent) / CANVAS_LONG_SIDE
    blank = np.full((int(np.ceil(extent[1] / downsample)), int(np.ceil(extent[0] / downsample)), 3), 255, np.uint8)
    return blank, downsample, False


def draw_tile_map(slide: SlideTiles, scores: np.ndarray, colours: TileColours, path: str | Path,
                  title: str = "") -> dict[str, Any]:
    """Any per-tile score over the slide's thumbnail, with its colour bar: what attention and occlusion share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = slide.coords().astype(np.float64)
    tile = tile_size_level0(slide, coords)
    rgb, downsample, thumbnail = slide_canvas(slide, coords, tile)
    blended = paint_tiles(rgb, coords, colours.rgb, tile, downsample)
    height, width = blended.shape[:2]
    fig, ax = plt.subplots(figsize=(7, 7 * height / max(width, 1) + 0.6), dpi=120)
    ax.imshow(blended)
    ax.set_axis_off()
    ax.set_title(title or slide.slide_id, fontsize=9)
    scale = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(colours.vmin, colours.vmax), cmap=colours.cmap)
    bar = fig.colorbar(scale, ax=ax, fraction=0.035, pad=0.02)
    bar.set_label(colours.label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    top = np.argsort(scores)[::-1][:5]
    return {"slide_id": slide.slide_id, "tiles": int(len(scores)), "png": str(path), "thumbnail": thumbnail,
            "top_tiles_level0_xy": coords[top].astype(int).tolist()}


def draw_heatmap(model: MILModel, slide: SlideTiles, path: str | Path, title: str = "") -> dict[str, Any]:
    """A MIL head's tile attention over the thumbnail."""
    scores = tile_scores(model, slide)
    return {"method": "attention"} | draw_tile_map(slide, scores, percentile_colours(scores), path, title)


def draw_occlusion(occlusion: Occlusion, slide: SlideTiles, path: str | Path, quantity: str,
                   title: str = "") -> dict[str, Any]:
    """Occlusion scores (slidecache/heads/occlusion.py) over the thumbnail: `quantity` names the head's output."""
    removed = "the tile" if occlusion.group_side == 1 else f"the tile's {occlusion.group_side}x{occlusion.group_side} group"
    label = f"{quantity} with {removed} − without it (occlusion)\nred: it raises the {quantity}, blue: lowers it"
    colours = diverging_colours(occlusion.scores, label)
    return occlusion.record() | {"score": quantity} | draw_tile_map(slide, occlusion.scores, colours, path, title)
