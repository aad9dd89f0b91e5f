"""InternVL's dynamic resolution: an image becomes a grid of square tiles whose aspect ratio is closest to
the image's, plus an optional thumbnail of the whole image.

Same rule as InternVL's `dynamic_preprocess` / `find_closest_aspect_ratio` (internvl_chat), with the tile
size set to the encoder's input (224 px for Virchow-2 instead of InternViT's 448): candidate grids are
every (cols, rows) with min_num <= cols x rows <= max_num, ordered by tile count; the grid whose aspect
ratio is nearest wins, and on a tie the later (larger) grid wins when the image has more than half of that
grid's pixels. The image is resized (bicubic) to the grid and cut row by row; the thumbnail is the whole
image resized to one tile and is added only when the grid has more than one tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class TileLayout:
    cols: int
    rows: int
    thumbnail: bool

    @property
    def n_tiles(self) -> int:
        return self.cols * self.rows + int(self.thumbnail)


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}
    return sorted(ratios, key=lambda r: r[0] * r[1])


def closest_aspect_ratio(aspect_ratio: float, ratios: list[tuple[int, int]], width: int, height: int,
                         tile_px: int) -> tuple[int, int]:
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * tile_px * tile_px * ratio[0] * ratio[1]:
            best = ratio
    return best


def choose_layout(width: int, height: int, min_num: int = 1, max_num: int = 6, tile_px: int = 224,
                  use_thumbnail: bool = True) -> TileLayout:
    if not 1 <= min_num <= max_num:
        raise ValueError(f"need 1 <= min_dynamic_patch ({min_num}) <= max_dynamic_patch ({max_num})")
    cols, rows = closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, tile_px)
    return TileLayout(cols, rows, use_thumbnail and cols * rows != 1)


def dynamic_tiles(image: Image.Image, min_num: int = 1, max_num: int = 6, tile_px: int = 224,
                  use_thumbnail: bool = True) -> tuple[np.ndarray, TileLayout]:
    """RGB image → (n, tile_px, tile_px, 3) uint8 tiles (grid row by row, then the thumbnail) and the layout."""
    image = image.convert("RGB")
    layout = choose_layout(*image.size, min_num, max_num, tile_px, use_thumbnail)
    resized = np.asarray(image.resize((layout.cols * tile_px, layout.rows * tile_px), Image.Resampling.BICUBIC))
    tiles = [resized[r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px]
             for r in range(layout.rows) for c in range(layout.cols)]
    if layout.thumbnail:
        tiles.append(np.asarray(image.resize((tile_px, tile_px), Image.Resampling.BICUBIC)))
    return np.stack(tiles), layout
