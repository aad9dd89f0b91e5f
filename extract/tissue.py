"""Tissue mask from a low-resolution thumbnail, and each tile's tissue fraction.

Saturation separates stained tissue from glass. The threshold is Otsu's on the thumbnail's saturation,
kept inside [0.03, 0.08]: Otsu alone lands between background and the *median* of tissue on a slide with
much tissue (cutting pale stroma away), and CLAM's fixed 8/255 is the field's usual floor. Then ink is
removed where it can be: green/blue pixels (H&E has no green and its blue is violet), and whole regions
that are mostly pure red (pen outlines; eosin is pinker and never dominates a region that much). An
opening drops thin dark lines (coverslip edges, hairs), small specks go, holes are filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from extract.readers import SlideReader

THUMBNAIL_MAX_SIDE = 2048
# A tile's tissue fraction needs no finer mask than this; a finer one only costs time (a small slide
# masked at full resolution) and store bytes (the thumbnail was most of a tiny encoder's store).
THUMBNAIL_PX_PER_TILE = 16
THUMBNAIL_MIN_SIDE = 512  # ... but a small slide keeps enough pixels for Otsu and the morphology to work on
SATURATION_RANGE = (0.03, 0.08)
MIN_REGION_FRACTION = 2e-4  # of the thumbnail's pixels (and at least a few pixels)
RED_REGION_FRACTION = 0.4


@dataclass(frozen=True)
class TissueParams:
    min_tissue: float = 0.25  # a tile is kept when at least this fraction of it is tissue
    thumbnail_max_side: int = THUMBNAIL_MAX_SIDE
    thumbnail_px_per_tile: int = THUMBNAIL_PX_PER_TILE  # the mask is never finer than this many px per tile side
    thumbnail_min_side: int = THUMBNAIL_MIN_SIDE  # unless that leaves the thumbnail smaller than this

    def describe(self) -> dict:
        return {"method": "otsu-saturation+ink-filter+morphology", "min_tissue": self.min_tissue,
                "saturation_range": list(SATURATION_RANGE), "thumbnail_max_side": self.thumbnail_max_side,
                "thumbnail_px_per_tile": self.thumbnail_px_per_tile, "thumbnail_min_side": self.thumbnail_min_side}

    def min_downsample(self, level0_size: tuple[int, int], tile_level0: float) -> float:
        """Level-0 px per thumbnail px below which a finer mask buys nothing (see the constants above)."""
        return min(tile_level0 / self.thumbnail_px_per_tile, max(level0_size) / self.thumbnail_min_side)


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value in [0, 1] as float32 (skimage's rgb2hsv in float64 is 5x slower here)."""
    c = rgb[..., :3].astype(np.float32) / 255.0
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    vmax, vmin = c.max(axis=-1), c.min(axis=-1)
    delta = vmax - vmin
    sat = np.where(vmax > 0, delta / np.maximum(vmax, 1e-6), 0.0)
    safe = np.maximum(delta, 1e-6)
    hue = np.where(vmax == r, (g - b) / safe % 6.0, np.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    return np.where(delta > 0, hue, 0.0).astype(np.float32), sat.astype(np.float32), vmax


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 → (h, w) bool tissue mask."""
    hue, sat, val = hsv(rgb)
    sat = ndimage.median_filter(sat, size=3)
    if float(sat.max() - sat.min()) < 1e-6:
        return np.zeros(sat.shape, dtype=bool)
    lo, hi = SATURATION_RANGE
    threshold = float(np.clip(threshold_otsu(sat), lo, hi))
    mask = (sat > threshold) & (val > 0.12)  # very dark pixels: ink, shadows, slide edges
    green_or_blue = (hue > 0.2) & (hue < 0.62) & (sat > 0.15)
    mask &= ~ndimage.binary_dilation(green_or_blue, iterations=2)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3)), iterations=1)
    labels, n = ndimage.label(mask)
    if n:
        ids = np.arange(1, n + 1)
        area = ndimage.sum(np.ones_like(labels), labels, ids)
        red = ((hue > 0.94) | (hue < 0.04)) & (sat > 0.3)
        red_fraction = ndimage.sum(red, labels, ids) / np.maximum(area, 1)
        keep = (area >= max(8, MIN_REGION_FRACTION * mask.size)) & (red_fraction < RED_REGION_FRACTION)
        mask = keep[labels - 1] & (labels > 0)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2))
    return mask


def read_thumbnail(reader: SlideReader, max_side: int = THUMBNAIL_MAX_SIDE,
                   min_downsample: float = 1.0) -> tuple[np.ndarray, float]:
    """An RGB thumbnail of at most max_side pixels and its downsample (level-0 px per thumbnail px), which is
    at least min_downsample.

    Reads the coarsest level in blocks and shrinks each by area averaging, so a slide without a
    pyramid never sits in memory at full resolution.
    """
    width0, height0 = reader.level_dimensions[0]
    factor0 = max(1.0, min_downsample, max(width0, height0) / max_side)  # level-0 px per thumbnail px
    # The coarsest level that is still at least as fine as the thumbnail.
    level = max((i for i, d in enumerate(reader.level_downsamples) if d <= factor0 + 1e-6),
                key=lambda i: reader.level_downsamples[i], default=0)
    d = reader.level_downsamples[level]
    lw, lh = reader.level_dimensions[level]
    # level px per thumbnail px: an integer (block area averaging), rounded up so the side stays <= max_side
    step = max(1, int(np.ceil(factor0 / d - 1e-9)))
    tw, th = max(1, lw // step), max(1, lh // step)
    thumb = np.empty((th, tw, 3), dtype=np.uint8)
    block = step * max(1, 4096 // step)  # level px per read, a multiple of step
    for y in range(0, th * step, block):
        for x in range(0, tw * step, block):
            bw, bh = min(block, tw * step - x), min(block, th * step - y)
            region = reader.read_region((int(x * d), int(y * d)), level, (bw, bh))
            small = np.asarray(Image.fromarray(region).reduce(step)) if step > 1 else region  # box average
            thumb[y // step: y // step + bh // step, x // step: x // step + bw // step] = small
    return thumb, float(d * step)


def tile_tissue_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray, tile_level0: float) -> np.ndarray:
    """Fraction of tissue under each tile (coords: (N, 2) level-0 x, y), by a summed-area table."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    x0 = np.clip(np.floor(coords[:, 0] / downsample), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / downsample), 0, h).astype(np.int64)
    x1 = np.clip(np.ceil((coords[:, 0] + tile_level0) / downsample), 0, w).astype(np.int64)
    y1 = np.clip(np.ceil((coords[:, 1] + tile_level0) / downsample), 0, h).astype(np.int64)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (inside / area).astype(np.float32)
