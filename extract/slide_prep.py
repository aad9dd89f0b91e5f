"""Per-slide CPU work: plan a slide (reader, mpp, grid, tissue) and read its tiles at the exact scale."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from extract.config import ExtractConfig
from extract.mpp import Mpp, resolve_mpp
from extract.readers import READERS, SlideReader, open_slide
from extract.slide_source import source_facts
from extract.tiling import TilePlan, plan_tiles
from extract.tissue import TissueParams, read_thumbnail, tile_tissue_fractions, tissue_mask
from slidecache.cohorts.slides import SlideEntry


@dataclass
class PreparedSlide:
    """Everything about a slide except its embeddings: small enough to pass between processes."""

    entry: SlideEntry
    reader: str
    mpp: Mpp
    plan: TilePlan
    coords: np.ndarray  # (N, 2) int64 level-0 x, y of the kept tiles
    tissue: np.ndarray  # (N,) tissue fraction of each kept tile
    thumbnail: np.ndarray | None
    mask: np.ndarray | None
    downsample: float
    empty_reason: str | None
    attrs: dict[str, Any] = field(default_factory=dict)
    # (thumbnail, mask) as the encoder's writer takes them; with Ray, a reference to them (the driver then
    # never holds the pictures: extract/ray_executor.py), with thumbnail and mask left None here
    pictures: Any = None

    def writer_pictures(self) -> Any:
        return self.pictures if self.pictures is not None else (self.thumbnail, self.mask)

    @property
    def n_tiles(self) -> int:
        return len(self.coords)


def tissue_params(cfg: ExtractConfig) -> TissueParams:
    return TissueParams(min_tissue=cfg.min_tissue, thumbnail_max_side=cfg.thumbnail_max_side)


def prepare_slide(entry: SlideEntry, cfg: ExtractConfig) -> PreparedSlide:
    """Open, scale, tile and mask one slide. Raises our errors (SlideReadError, MppError) per slide."""
    started = time.perf_counter()
    opened = open_slide(entry.path, cfg.readers)
    reader = opened.reader
    try:
        mpp = resolve_mpp(reader.properties, entry.slide_id, cfg.mpp_override, entry.mpp)
        plan = plan_tiles(reader.level_dimensions, reader.level_downsamples, mpp.value, cfg.target_mpp,
                          cfg.tile_px, cfg.stride_px)
        floor = tissue_params(cfg).min_downsample(reader.level_dimensions[0], plan.tile_level0)
        thumbnail, downsample = read_thumbnail(reader, cfg.thumbnail_max_side, floor)
    finally:
        reader.close()
    mask = tissue_mask(thumbnail)
    grid = plan.grid_coords()
    fractions = tile_tissue_fractions(mask, downsample, grid, plan.tile_level0) if len(grid) else np.zeros(0, np.float32)
    keep = fractions >= cfg.min_tissue
    width, height = reader.level_dimensions[0]
    if plan.n_tiles == 0:
        tile_um = cfg.tile_px * cfg.target_mpp
        reason = (f"slide too small for one tile: {width} x {height} px at {mpp.value:.4g} µm/px is "
                  f"{width * mpp.value:.0f} x {height * mpp.value:.0f} µm; a tile needs {tile_um:.0f} µm")
    elif not keep.any():
        reason = (f"no tissue: none of {plan.n_tiles} tiles has >= {cfg.min_tissue:.0%} tissue "
                  f"(mask covers {mask.mean():.1%} of the thumbnail)")
    else:
        reason = None
    attrs = {
        "source": source_facts(entry.path) | ({"md5": entry.md5} if entry.md5 else {}),
        "patient_id": entry.patient_id,
        "mpp": mpp.value,
        "mpp_source": mpp.source,
        "reader": reader.name,
        "reader_notes": opened.notes,
        "level0_size": [int(width), int(height)],
        "tiling": plan.describe(),
        "tile_px_level0": plan.tile_level0,
        "grid_tiles": plan.n_tiles,
        "tissue_fraction_of_thumbnail": float(mask.mean()),
        "timings": {"prepare_s": round(time.perf_counter() - started, 3)},
    }
    return PreparedSlide(entry, reader.name, mpp, plan, grid[keep], fractions[keep], thumbnail, mask, downsample,
                         reason, attrs)


@lru_cache(maxsize=4)
def _cached_reader(name: str, path: str, pid: int) -> SlideReader:
    return READERS[name](path)


def read_tiles(reader_name: str, path: str, plan: TilePlan, coords: np.ndarray) -> np.ndarray:
    """(n, tile_px, tile_px, 3) uint8 tiles at the plan's exact scale, from the reader prepare chose."""
    reader = _cached_reader(reader_name, path, os.getpid())  # reopened per process, reused across chunks
    out = np.empty((len(coords), plan.tile_px, plan.tile_px, 3), dtype=np.uint8)
    size = (plan.read_px, plan.read_px)
    box = plan.box_factor
    for i, (x, y) in enumerate(coords):
        region = reader.read_region((int(x), int(y)), plan.level, size)
        if box:
            region = Image.fromarray(region).reduce(box)
        elif plan.needs_resize:
            region = Image.fromarray(region).resize((plan.tile_px, plan.tile_px), Image.Resampling.BICUBIC)
        out[i] = region
    return out
