"""Synthetic whole-slide images written by the project: H&E-like pixels in a real pyramidal TIFF.

Pyramids are written with tifffile as top-level IFDs (reduced levels marked NewSubfileType=1), tiled,
JPEG-compressed, with resolution tags in centimetres, which every reader (cuCIM, OpenSlide, tiffslide)
understands. SubIFD pyramids are avoided: cuCIM rejects them and OpenSlide silently returns blank pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

BACKGROUND = np.array([242, 240, 244], dtype=np.float32)
EOSIN = np.array([226, 140, 180], dtype=np.float32)
HEMATOXYLIN = np.array([95, 60, 140], dtype=np.float32)


def synthetic_he(height: int, width: int, seed: int = 0, nuclear_density: float = 0.004,
                 tissue_fraction: float = 0.5) -> np.ndarray:
    """(height, width, 3) uint8: smooth tissue regions of eosin pink with hematoxylin nuclei on glass.

    `nuclear_density` (nuclei per pixel of tissue) is the visual property the demo cohort varies.
    """
    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.normal(size=(max(4, height // 32), max(4, width // 32))), 2.0)
    field = ndimage.zoom(coarse, (height / coarse.shape[0], width / coarse.shape[1]), order=1)[:height, :width]
    tissue = field > np.quantile(field, 1 - tissue_fraction)
    texture = ndimage.gaussian_filter(rng.normal(size=(height, width)), 1.5).astype(np.float32)[..., None]
    img = np.where(tissue[..., None], EOSIN + 25 * texture, BACKGROUND + 3 * texture)  # float32 (h, w, 3)
    n_nuclei = int(nuclear_density * tissue.sum())
    if n_nuclei:
        ys, xs = np.nonzero(tissue)
        pick = rng.choice(len(ys), n_nuclei, replace=False)
        seeds = np.zeros((height, width), dtype=bool)
        seeds[ys[pick], xs[pick]] = True
        nuclei = ndimage.binary_dilation(seeds, iterations=2) & tissue
        img = np.where(nuclei[..., None], HEMATOXYLIN + 15 * texture, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pyramid(path: str | Path, level0: np.ndarray, mpp: float, levels: int = 3, tile: int = 256,
                  quality: int = 90) -> Path:
    """A tiled JPEG pyramid (downsample 2 per level) with resolution tags giving `mpp` µm/px."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=level0.nbytes > 2**31) as tif:
        image = level0
        for level in range(levels):
            if level and min(image.shape[:2]) < 2:
                break
            tif.write(
                image, photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                resolution=(pixels_per_cm / 2**level, pixels_per_cm / 2**level), resolutionunit="CENTIMETER",
                **({"subfiletype": 1} if level else {}),
            )
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


def write_repeated_slide(path: str | Path, width: int, height: int, mpp: float, seed: int = 0,
                         reduced: tuple[int, ...] = (32,), variants: int = 8) -> Path:
    """A large all-tissue slide written fast: a few JPEG tiles encoded once and repeated over level 0.

    For benchmarks at 10k-100k tiles, where encoding a real image of that size would take longer than
    the benchmark. Reduced levels (downsample factors in `reduced`) repeat the same tiles: every level
    shows tissue everywhere, which is all the tissue mask and the benchmarks need.
    """
    import imagecodecs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tile = 256
    width, height = width // tile * tile, height // tile * tile
    encoded = [imagecodecs.jpeg8_encode(synthetic_he(tile, tile, seed=seed + i, tissue_fraction=1.0), level=90)
               for i in range(variants)]
    rng = np.random.default_rng(seed)
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, factor in enumerate((1, *reduced)):
            h, w = max(tile, height // factor // tile * tile), max(tile, width // factor // tile * tile)
            order = rng.integers(0, variants, (h // tile) * (w // tile))  # level content: tissue everywhere
            tif.write((encoded[i] for i in order), shape=(h, w, 3), dtype="uint8", tile=(tile, tile),
                      compression="jpeg", photometric="rgb", resolution=(pixels_per_cm / factor, pixels_per_cm / factor),
                      resolutionunit="CENTIMETER", **({"subfiletype": 1} if level else {}))
    return path
