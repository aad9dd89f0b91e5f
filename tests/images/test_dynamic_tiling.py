"""InternVL's dynamic tiling at 224 px: the grid chosen for a table of image sizes (worked by hand from
InternVL's rule: nearest aspect ratio among cols x rows in [min, max], ties to the larger grid when the
image has over half its pixels), the tiles cut, and the thumbnail."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from extract.dynamic_tiling import TileLayout, choose_layout, dynamic_tiles, target_ratios

TABLE = [  # width, height, max_num, (cols, rows), thumbnail
    (224, 224, 6, (1, 1), False),    # one tile: no thumbnail
    (300, 300, 6, (1, 1), False),    # square tie with 2x2: 90,000 px < half of 2x2 (100,352): stays 1x1
    (320, 320, 6, (2, 2), True),     # 102,400 px > 100,352: the larger square grid wins the tie
    (1000, 1000, 6, (2, 2), True),
    (1000, 1000, 12, (3, 3), True),  # ties 1x1, 2x2, 3x3: the image has over half of 3x3's pixels
    (448, 224, 6, (2, 1), True),
    (224, 448, 6, (1, 2), True),
    (1200, 400, 6, (3, 1), True),
    (2000, 300, 6, (6, 1), True),    # 6.67:1, the widest grid allowed
    (640, 480, 6, (3, 2), True),     # 1.33: 3x2 (1.5) is nearer than 1x1 / 2x2 (1.0)
    (500, 1000, 6, (1, 2), True),
    (640, 480, 1, (1, 1), False),    # max_dynamic_patch 1: always one tile
]


@pytest.mark.parametrize("width,height,max_num,grid,thumbnail", TABLE)
def test_internvl_grid_for_aspect_ratios(width, height, max_num, grid, thumbnail):
    assert choose_layout(width, height, 1, max_num) == TileLayout(*grid, thumbnail)


def test_min_dynamic_patch_and_candidates():
    assert choose_layout(224, 224, min_num=2, max_num=6) == TileLayout(2, 2, True)  # 1x1 is not a candidate
    ratios = target_ratios(1, 6)
    assert ratios[0] == (1, 1) and len(ratios) == 14 and all(1 <= c * r <= 6 for c, r in ratios)
    assert [c * r for c, r in ratios] == sorted(c * r for c, r in ratios)
    with pytest.raises(ValueError, match="min_dynamic_patch"):
        choose_layout(224, 224, 3, 2)


def test_tiles_are_the_resized_image_cut_row_by_row_then_the_thumbnail():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))  # 5:3: 3x2 (1.5) is nearest
    tiles, layout = dynamic_tiles(image, 1, 6)
    assert tiles.shape == (layout.n_tiles, 224, 224, 3) and tiles.dtype == np.uint8
    resized = np.asarray(image.resize((layout.cols * 224, layout.rows * 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiles[1], resized[0:224, 224:448])  # second tile: first row, second column
    np.testing.assert_array_equal(tiles[-1], np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC)))
    gray = Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8), mode="L")
    assert dynamic_tiles(gray)[0].shape == (1, 224, 224, 3)  # greyscale is converted, not rejected
