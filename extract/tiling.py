"""The tile grid at an exact physical scale, and the pyramid level to read it from.

A tile covers tile_px x target_mpp µm of tissue: tile_px * target_mpp / mpp level-0 pixels. The grid
starts at level-0 (0, 0), steps by the stride (= the tile by default) and keeps whole tiles only. Tiles
are read from the coarsest level that is still at least as fine as the target (so we only ever shrink),
then resized to tile_px when the level's pixels do not land on it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slidecache.errors import ConfigError

_LEVEL_TOLERANCE = 1e-3  # a level 0.1% finer than needed still counts as "not coarser than the target"


@dataclass(frozen=True)
class TilePlan:
    mpp: float  # µm per level-0 pixel of the slide
    target_mpp: float
    tile_px: int  # output tile side
    tile_level0: float  # tile side in level-0 pixels
    stride_level0: float
    level: int  # pyramid level read
    level_downsample: float
    read_px: int  # region side read at `level`, resized to tile_px when different
    cols: int
    rows: int

    @property
    def n_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def needs_resize(self) -> bool:
        return self.read_px != self.tile_px

    @property
    def box_factor(self) -> int | None:
        """k when the region read is exactly k times the tile: then a k x k box average makes the tile.

        That is what a scanner's own pyramid level would hold, and 10x faster than bicubic resampling.
        """
        if self.read_px > self.tile_px and self.read_px % self.tile_px == 0:
            return self.read_px // self.tile_px
        return None

    @property
    def resample(self) -> str:
        if not self.needs_resize:
            return "none"
        return f"box{self.box_factor}" if self.box_factor else "bicubic"

    @property
    def upsampled(self) -> bool:
        """True when even level 0 is coarser than the target (tiles are enlarged: say so in the record)."""
        return self.tile_level0 < self.tile_px * (1 - _LEVEL_TOLERANCE)

    def grid_coords(self) -> np.ndarray:
        """(cols * rows, 2) int64 level-0 (x, y) of every whole tile's top-left corner, row-major."""
        xs = np.round(np.arange(self.cols) * self.stride_level0).astype(np.int64)
        ys = np.round(np.arange(self.rows) * self.stride_level0).astype(np.int64)
        gx, gy = np.meshgrid(xs, ys)
        return np.stack([gx.ravel(), gy.ravel()], axis=1)

    def describe(self) -> dict:
        return {"level": self.level, "level_downsample": self.level_downsample, "read_px": self.read_px,
                "resample": self.resample, "tile_px_level0": self.tile_level0, "grid": [self.cols, self.rows],
                "upsampled": self.upsampled}


def plan_tiles(level_dimensions: list[tuple[int, int]], level_downsamples: list[float], mpp: float,
               target_mpp: float = 0.5, tile_px: int = 224, stride_px: int | None = None) -> TilePlan:
    if tile_px <= 0 or target_mpp <= 0 or mpp <= 0:
        raise ConfigError(f"tile_px, target_mpp and mpp must be positive (got {tile_px}, {target_mpp}, {mpp})")
    stride_px = stride_px or tile_px
    scale = target_mpp / mpp  # level-0 pixels per output pixel
    tile_level0 = tile_px * scale
    stride_level0 = stride_px * scale
    # Coarsest level whose pixels are not coarser than the target's; level 0 when the target is finer.
    usable = [i for i, d in enumerate(level_downsamples) if d <= scale * (1 + _LEVEL_TOLERANCE)]
    level = max(usable, key=lambda i: level_downsamples[i]) if usable else 0
    downsample = float(level_downsamples[level])
    read_px = max(1, int(round(tile_level0 / downsample)))
    width, height = level_dimensions[0]
    cols = int(math.floor((width - tile_level0) / stride_level0)) + 1 if width >= tile_level0 else 0
    rows = int(math.floor((height - tile_level0) / stride_level0)) + 1 if height >= tile_level0 else 0
    return TilePlan(mpp, target_mpp, tile_px, tile_level0, stride_level0, level, downsample, read_px,
                    cols if rows else 0, rows if cols else 0)
