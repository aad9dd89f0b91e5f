"""Slide readers on the real files of ../shared/data/wsi: good slides open, bad ones fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from extract.readers import READERS, is_blank, open_slide
from slidecache.errors import SlideReadError


@pytest.mark.parametrize("relpath, reader, level0", [
    ("aperio/CMU-1-Small-Region.svs", "cucim", (2220, 2967)),
    ("aperio/openslide-small.svs", "cucim", (16, 16)),
    ("generic_tiff/boxes.tiff", "openslide", (300, 250)),  # deflate: kept away from cuCIM, which crashes on it
    ("dicom/openslide_boxes", "openslide", (16, 16)),  # two instances, one slide
])
def test_good_slides_open(shared_data, relpath, reader, level0):
    opened = open_slide(shared_data / "wsi" / relpath)
    assert opened.reader.name == reader and opened.reader.level_dimensions[0] == level0
    size = (min(level0[0], 128), min(level0[1], 128))
    region = opened.reader.read_region((0, 0), 0, size)
    assert region.shape == (size[1], size[0], 3) and region.dtype == np.uint8 and not is_blank(region)
    opened.reader.close()


def test_readers_give_identical_pixels(shared_data):
    path = str(shared_data / "wsi/aperio/CMU-1-Small-Region.svs")
    regions = {}
    for name, make in READERS.items():
        reader = make(path)
        regions[name] = reader.read_region((1000, 1200), 0, (224, 224))
        reader.close()
    np.testing.assert_array_equal(regions["cucim"], regions["openslide"])
    np.testing.assert_array_equal(regions["tiffslide"], regions["openslide"])


@pytest.mark.parametrize("relpath, fragments", [
    ("bad_inputs/unreadable.svs", ["cannot decode pixels", "Bogus marker length", "cucim decodes pixels tiffslide cannot confirm"]),
    ("bad_inputs/unopenable.tiff", ["52479"]),
    ("bad_inputs/broken-random-ascii.svs", ["not a TIFF file", "openslide cannot open it"]),
    ("does-not-exist.svs", ["no such file or folder"]),
])
def test_bad_slides_fail_with_every_readers_reason(shared_data, relpath, fragments):
    with pytest.raises(SlideReadError) as err:
        open_slide(shared_data / "wsi" / relpath)
    message = str(err.value)
    assert str(shared_data / "wsi" / relpath) in message
    for fragment in fragments:
        assert fragment in message


def test_blank_detection():
    assert is_blank(np.full((8, 8, 3), 255, np.uint8))
    noisy = np.full((8, 8, 3), 255, np.uint8)
    noisy[3, 4, 1] = 0
    assert not is_blank(noisy)
