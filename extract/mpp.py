"""The physical pixel size (µm per level-0 pixel) of a slide, and where it came from.

Order: a run-wide `--mpp-override`, the cohort table's mpp column, vendor metadata (OpenSlide's
normalised openslide.mpp-x/y, Aperio's MPP, DICOM pixel spacing), then TIFF resolution tags with their
unit. A value outside the plausible range is refused rather than used: a 72-dpi placeholder tag reads
as 352.8 µm/px, and tiling at that scale would silently produce a handful of meaningless tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from slidecache.errors import MppError

PLAUSIBLE_MPP = (0.05, 20.0)  # 0.05 µm/px is beyond any optical scanner; 20 µm/px is a ~0.5x overview
ANISOTROPY_TOLERANCE = 0.05
_UM_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0, "millimeter": 1e3, "mm": 1e3}


@dataclass(frozen=True)
class Mpp:
    value: float  # µm per level-0 pixel
    source: str


def _as_float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _pair(props: Mapping[str, Any], kx: str, ky: str) -> tuple[float, float] | None:
    x, y = _as_float(props.get(kx)), _as_float(props.get(ky))
    if x and y:
        return x, y
    return (x, x) if x else None


def _from_resolution_tags(props: Mapping[str, Any]) -> tuple[float, float] | None:
    unit = str(props.get("tiff.ResolutionUnit", props.get("tiff.resolution_unit", ""))).strip().lower()
    if unit not in _UM_PER_UNIT:
        return None  # no unit ("none") means the tags carry no physical scale
    xres = _as_float(props.get("tiff.XResolution", props.get("tiff.x_resolution")))
    yres = _as_float(props.get("tiff.YResolution", props.get("tiff.y_resolution")))
    if not xres:
        return None
    per = _UM_PER_UNIT[unit]
    return per / xres, per / (yres or xres)


def _candidates(props: Mapping[str, Any]) -> list[tuple[str, tuple[float, float] | None]]:
    return [
        ("openslide.mpp-x/y", _pair(props, "openslide.mpp-x", "openslide.mpp-y")),
        ("tiffslide.mpp-x/y", _pair(props, "tiffslide.mpp-x", "tiffslide.mpp-y")),
        ("aperio.MPP", _pair(props, "aperio.MPP", "aperio.MPP")),
        ("TIFF resolution tags", _from_resolution_tags(props)),
    ]


def check_plausible(value: float, source: str, slide: str) -> float:
    lo, hi = PLAUSIBLE_MPP
    if not lo <= value <= hi:
        hint = " (a 72-dpi placeholder in the TIFF tags?)" if value > 100 else ""
        raise MppError(f"slide {slide}: {value:.4g} µm/px from {source} is not plausible{hint}; "
                       "give the slide's real mpp in the cohort table's mpp column or with --mpp-override")
    return value


def resolve_mpp(properties: Mapping[str, Any], slide: str, override: float | None = None,
                cohort_mpp: float | None = None) -> Mpp:
    """The slide's mpp with its source, or MppError naming the slide and what to do."""
    if override is not None:
        return Mpp(check_plausible(float(override), "--mpp-override", slide), "override")
    if cohort_mpp is not None:
        return Mpp(check_plausible(float(cohort_mpp), "the cohort table", slide), "cohort table")
    for source, pair in _candidates(properties):
        if pair is None:
            continue
        x, y = pair
        if abs(x - y) > ANISOTROPY_TOLERANCE * max(x, y):
            raise MppError(f"slide {slide}: pixels are not square ({x:.4g} x {y:.4g} µm from {source}); "
                           "slidecache tiles square pixels only")
        return Mpp(check_plausible((x + y) / 2, source, slide), source)
    raise MppError(f"slide {slide}: no pixel size in its metadata (vendor fields or TIFF resolution tags); "
                   "give it in the cohort table's mpp column or with --mpp-override")
