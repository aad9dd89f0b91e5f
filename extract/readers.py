"""Whole-slide readers behind one small interface: cuCIM, then OpenSlide, then tiffslide.

`open_slide(path)` tries them in that order and keeps the first that opens the file AND decodes a probe
region with real content. That probe catches two silent failures: a file whose header parses but whose
tiles do not decode (it fails here, per slide, not mid-extraction), and a pyramid a reader does not
understand and returns as blank pixels (OpenSlide does that with SubIFD pyramids). Every reader's
complaint goes into the error when none works. The reader used is recorded with each slide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from slidecache.errors import SlideReadError

log = logging.getLogger(__name__)
READER_ORDER = ("cucim", "openslide", "tiffslide")
_PROBE_MAX_SIDE = 512  # the probe reads the smallest level, or a region of at most this many pixels


class SlideReader(Protocol):
    name: str
    path: str
    level_dimensions: list[tuple[int, int]]  # (width, height) per level, level 0 first
    level_downsamples: list[float]
    properties: dict[str, Any]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` (w, h) pixels at `level`, top-left at level-0 `location` (x, y)."""
        ...

    def close(self) -> None: ...


def _rgba_to_rgb(region: np.ndarray) -> np.ndarray:
    """Composite RGBA on white (OpenSlide marks pixels outside the scanned area transparent)."""
    if region.shape[-1] == 3:
        return region
    if region[..., 3].min() == 255:  # the usual case: fully opaque, no blending needed
        return region[..., :3]
    rgb, alpha = region[..., :3].astype(np.float32), region[..., 3:4].astype(np.float32) / 255.0
    return (rgb * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)


@dataclass
class _OpenSlideAPIReader:
    """Shared by OpenSlide and tiffslide, which expose the same API (tiffslide was written to match it)."""

    path: str
    name: str = ""
    level_dimensions: list[tuple[int, int]] = field(init=False)
    level_downsamples: list[float] = field(init=False)
    properties: dict[str, Any] = field(init=False)

    def _open(self) -> Any:
        raise TypeError("use OpenSlideReader or TiffSlideReader")

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        return self._slide.read_region(location, level, size)

    def __post_init__(self) -> None:
        self._slide = self._open()
        self.level_dimensions = [tuple(d) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        self.properties = dict(self._slide.properties)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return _rgba_to_rgb(np.asarray(self._read(location, level, size)))

    def close(self) -> None:
        self._slide.close()


@dataclass
class OpenSlideReader(_OpenSlideAPIReader):
    name: str = "openslide"

    def _open(self) -> Any:
        import openslide

        return openslide.OpenSlide(_dicom_instance(self.path) or self.path)  # a DICOM series opens from any instance


@dataclass
class TiffSlideReader(_OpenSlideAPIReader):
    name: str = "tiffslide"

    def _open(self) -> Any:
        import tiffslide

        return tiffslide.TiffSlide(self.path)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        return self._slide.read_region(location, level, size, as_array=True)


@dataclass
class CucimReader:
    path: str
    name: str = "cucim"
    level_dimensions: list[tuple[int, int]] = field(init=False)
    level_downsamples: list[float] = field(init=False)
    properties: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        if Path(self.path).is_dir() or Path(self.path).suffix.lower() == ".dcm":
            raise SlideReadError("cuCIM does not read DICOM")
        _require_cucim_safe_tiff(self.path)
        from cucim import CuImage

        self._image = CuImage(self.path)
        res = self._image.resolutions
        self.level_dimensions = [tuple(int(v) for v in d) for d in res["level_dimensions"]]
        self.level_downsamples = [float(d) for d in res["level_downsamples"]]
        self.properties = _flatten(self._image.metadata)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        region = self._image.read_region(location=location, size=size, level=level)
        return _rgba_to_rgb(np.asarray(region))

    def close(self) -> None:
        self._image.close()


# TIFF compressions cuCIM decodes reliably. It crashes the whole process (SIGSEGV) on a deflate pyramid
# on CPU, which no try/except can catch, so other files never reach it.
_CUCIM_SAFE_COMPRESSIONS = {1, 7}  # none, JPEG


def _require_cucim_safe_tiff(path: str) -> None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            # Pyramid levels are tiled pages; associated images (label, macro) are strips cuCIM never decodes.
            compressions = {int(page.compression) for page in tif.pages if page.is_tiled}
    except (tifffile.TiffFileError, ValueError, OSError) as e:
        raise SlideReadError(f"not a TIFF cuCIM can read ({e})") from e
    unsafe = compressions - _CUCIM_SAFE_COMPRESSIONS
    if unsafe:
        raise SlideReadError(f"TIFF compression {sorted(unsafe)} is left to the other readers")


def _flatten(meta: Any, prefix: str = "") -> dict[str, Any]:
    """cuCIM's nested metadata as OpenSlide-style dotted keys ('aperio.MPP', 'tiff.resolution_unit')."""
    if not isinstance(meta, dict):
        return {prefix.rstrip("."): meta}
    out: dict[str, Any] = {}
    for key, value in meta.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _dicom_instance(path: str) -> str | None:
    folder = Path(path)
    if folder.is_dir():
        instances = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
        return str(instances[0]) if instances else None
    return None


READERS: dict[str, Callable[[str], SlideReader]] = {
    "cucim": CucimReader,
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
}


def probe(reader: SlideReader) -> np.ndarray:
    """Decode a small picture of the whole slide: the smallest level, or its top-left corner if large."""
    level = len(reader.level_dimensions) - 1
    w, h = reader.level_dimensions[level]
    return reader.read_region((0, 0), level, (min(w, _PROBE_MAX_SIDE), min(h, _PROBE_MAX_SIDE)))


def is_blank(pixels: np.ndarray) -> bool:
    """True when every pixel is the same colour: what a reader that silently failed returns."""
    return pixels.size == 0 or bool((pixels == pixels.reshape(-1, pixels.shape[-1])[0]).all())


def _agrees_with_tiffslide(path: str, reader: SlideReader) -> bool:
    """cuCIM logs, but does not raise on, a JPEG tile it cannot decode: confirm a level-0 region with
    tiffslide. JPEG decoders may round differently, so "agree" allows a mean difference of 2 levels."""
    w, h = reader.level_dimensions[0]
    size = (min(w, _PROBE_MAX_SIDE), min(h, _PROBE_MAX_SIDE))
    try:
        other = TiffSlideReader(path)
        try:
            a = reader.read_region((0, 0), 0, size).astype(np.int16)
            b = other.read_region((0, 0), 0, size).astype(np.int16)
        finally:
            other.close()
    except Exception:  # noqa: BLE001 - any failure to confirm means: do not trust this decode
        return False
    return a.shape == b.shape and float(np.abs(a - b).mean()) <= 2.0


@dataclass
class OpenedSlide:
    reader: SlideReader
    notes: list[str]  # why earlier readers were passed over (recorded with the slide)


def open_slide(path: str | Path, order: tuple[str, ...] = READER_ORDER) -> OpenedSlide:
    """The first reader in `order` that opens `path` and decodes non-blank pixels.

    A slide every reader sees as one flat colour is returned with the last such reader (it may truly be
    empty; the tissue step decides). SlideReadError when no reader can open and decode it.
    """
    path = str(path)
    if not Path(path).exists():
        raise SlideReadError(f"{path}: no such file or folder; check the cohort table's path")
    complaints: list[str] = []
    blank: SlideReader | None = None
    for name in order:
        try:
            reader = READERS[name](path)
        except Exception as e:  # noqa: BLE001 - each reader fails in its own way; we report them all
            complaints.append(f"{name} cannot open it ({type(e).__name__}: {str(e).strip()[:200]})")
            continue
        try:
            pixels = probe(reader)
        except Exception as e:  # noqa: BLE001
            complaints.append(f"{name} opens it but cannot decode pixels ({type(e).__name__}: {str(e).strip()[:200]})")
            reader.close()
            continue
        if name == "cucim" and not _agrees_with_tiffslide(path, reader):
            complaints.append("cucim decodes pixels tiffslide cannot confirm (a corrupt tile cuCIM passes silently?)")
            reader.close()
            continue
        if is_blank(pixels):
            complaints.append(f"{name} returns only blank pixels (an unsupported pyramid layout?)")
            if blank is not None:
                blank.close()
            blank = reader
            continue
        if blank is not None:
            blank.close()
        return OpenedSlide(reader, complaints)
    if blank is not None:
        return OpenedSlide(blank, complaints)
    raise SlideReadError(f"{path}: no reader could read this slide: " + "; ".join(complaints)
                         + ". Check that the file is a complete whole-slide image (re-download it if its size or md5 differs).")
