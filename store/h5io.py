"""TRIDENT / CLAM per-slide .h5 files ⇄ the store, so features flow both ways with that ecosystem.

Layout written and read: `<slide_id>.h5` with datasets `features` (N, D) float32 and `coords` (N, 2)
int64 (level-0 px), and on `coords` the attributes TRIDENT and CLAM readers look for: TRIDENT's
patch_size_level0, level0_magnification, target_magnification, overlap, name, level0_width/height; and
CLAM's pair `patch_level`, `patch_size`, which CLAM reads as `read_region(coord, patch_level, (patch_size,
patch_size))`, so `patch_size` is the tile side in pixels *of the level named* (the frame TRIDENT documents
for it too, "reference frame: patch_level"). When the tiles were read unresampled from a pyramid level,
that level is named and `patch_size` is the tile size (224); otherwise level 0 is named with the tile's
level-0 side (e.g. 448 for 224 px at 0.5 µm/px cut from a 0.25 µm/px level 0 without a 0.5 µm/px level).
The tile size at the target magnification is always `target_patch_size`. slidecache's own facts ride along under `slidecache_*` attributes.
An import cannot know the encoder's weights or the tissue fractions: those are marked unknown and the
store is flagged `imported`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from slidecache.cohorts.ids import patient_id_for, validate_slide_id
from slidecache.errors import InteropError, InvalidSlideId, SlideBusy, SlideWriteError
from slidecache.provenance import UNKNOWN
from slidecache.tile_embeddings import embedding_width
from store.embedding_store import EmbeddingStore
from store.slide_view import SlideView

MPP_AT_1X = 10.0  # the usual convention: 0.5 µm/px at 20x, 0.25 at 40x


def _json_safe(value: Any) -> str:
    return json.dumps(value, default=str)


def export_h5(store: EmbeddingStore, out_dir: str | Path, slide_ids: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write one TRIDENT-style .h5 per complete slide (features as float32, as those tools expect)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for slide_id in slide_ids or store.slide_ids():
        slide = store.slide(slide_id)
        tmp = out / f".{slide_id}.h5.partial"
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(slide.n_tiles, slide.embedding_dim), dtype="float32")
            coords = f.create_dataset("coords", shape=(slide.n_tiles, 2), dtype="int64")
            for rows in slide.row_blocks():
                feats[rows] = slide.embeddings(rows).astype(np.float32)
                coords[rows] = slide.coords(rows)
            coords.attrs.update(coords_attrs(store, slide))
            mpp = slide.attrs.get("mpp")
            f.attrs.update({
                "slidecache_fingerprint": store.fingerprint,
                "slidecache_encoder": _json_safe(store.spec.get("encoder", {})),
                "slidecache_patient_id": slide.patient_id,
                "slidecache_mpp": float(mpp) if mpp else -1,
            })
        tmp.replace(out / f"{slide_id}.h5")  # whole file or nothing
        written.append(out / f"{slide_id}.h5")
        if progress:
            progress(slide_id)
    return written


def coords_attrs(store: EmbeddingStore, slide: SlideView) -> dict[str, Any]:
    """The attributes TRIDENT and CLAM readers look for on a slide's `coords` dataset (see the module docstring)."""
    tiling = store.spec.get("tiling", {})
    tile_px, target_mpp = tiling.get("tile_px"), tiling.get("target_mpp")
    mpp = slide.attrs.get("mpp")
    patch_level0 = slide.attrs.get("tile_px_level0")
    if patch_level0 is None and isinstance(tile_px, (int, float)) and isinstance(target_mpp, (int, float)) and mpp:
        patch_level0 = int(round(tile_px * target_mpp / float(mpp)))
    level0_side = int(patch_level0) if patch_level0 else -1
    size = slide.attrs.get("level0_size") or [-1, -1]
    patch_level, patch_size, downsample = _clam_patch(slide.attrs.get("tiling") or {}, tile_px, level0_side)
    return {
        # CLAM: read_region(coord, patch_level, (patch_size, patch_size)) reads exactly the tile
        "patch_level": patch_level,
        "patch_size": patch_size,
        "downsample": [downsample, downsample],
        # TRIDENT
        "patch_size_level0": level0_side,
        "target_patch_size": int(tile_px) if isinstance(tile_px, (int, float)) else -1,
        "level0_magnification": float(MPP_AT_1X / mpp) if mpp else -1,
        "target_magnification": float(MPP_AT_1X / target_mpp) if isinstance(target_mpp, (int, float)) else -1,
        "overlap": 0,
        "name": slide.slide_id,
        "level0_width": int(size[0]),
        "level0_height": int(size[1]),
    }


def _clam_patch(tiling: dict[str, Any], tile_px: Any, level0_side: int) -> tuple[int, int, float]:
    """(patch_level, patch_size at that level, its downsample) for CLAM's readers."""
    if tiling.get("resample") == "none" and tiling.get("read_px") == tile_px and tiling.get("level") is not None:
        return int(tiling["level"]), int(tile_px), float(tiling.get("level_downsample") or 1.0)
    return 0, level0_side, 1.0


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]]:
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise InteropError(f"{path}: a TRIDENT/CLAM file needs datasets 'features' and 'coords', found {list(f)}")
            features, coords = f["features"][...], f["coords"][...]
            coord_attrs = {k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f["coords"].attrs.items()}
            file_attrs = dict(f.attrs)
    except OSError as e:
        raise InteropError(f"{path}: not a readable HDF5 file ({e})") from e
    # some tools save a batch of one: (1, N, D) features and (1, N, 2) coords
    features, coords = (a[0] if a.ndim == 3 and a.shape[0] == 1 else a for a in (features, coords))
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(features):
        raise InteropError(f"{path}: features {features.shape} and coords {coords.shape} do not pair up as (N, D) and (N, 2)")
    return features, coords, coord_attrs, file_attrs


def _checked_rows(path: Path, features: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features as the store's float16, coords as int64), or InteropError naming the first bad row: checked
    before anything is written, so a refused file leaves no slide (nor an empty store) behind."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is what is looked for below
            stored = features.astype(np.float16)
            finite_coords = np.isfinite(coords.astype(np.float64)).all(axis=1)
    except (TypeError, ValueError) as e:
        raise InteropError(f"{path}: features {features.dtype} / coords {coords.dtype} are not numbers ({e})") from e
    bad = ~np.isfinite(stored).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        nan = not np.isfinite(features[row].astype(np.float64)).all()
        what = "NaN/Inf" if nan else "values beyond float16's ±65504"
        raise InteropError(f"{path}: features row {row} holds {what} ({int(bad.sum())} of {len(bad)} rows); the store "
                           "keeps finite float16 embeddings: fix or re-extract this file")
    outside = ~finite_coords | (coords < 0).any(axis=1) | (coords > np.iinfo(np.int32).max).any(axis=1)
    if outside.any():
        row = int(np.argmax(outside))
        raise InteropError(f"{path}: coords row {row} is {coords[row].tolist()}; coords must be non-negative level-0 "
                           "pixels below 2^31")
    return stored, coords.astype(np.int64)


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _target_tile_px(attrs: dict[str, Any]) -> float | None:
    """The tile side at the target magnification: `target_patch_size`, else derived from TRIDENT's level-0
    side and magnifications, else `patch_size` (TRIDENT files give it at the target magnification)."""
    explicit = _positive(attrs.get("target_patch_size"))
    if explicit:
        return explicit
    level0, mag0, mag = (_positive(attrs.get(k)) for k in ("patch_size_level0", "level0_magnification",
                                                           "target_magnification"))
    if level0 and mag0 and mag:
        return round(level0 * mag / mag0)
    return _positive(attrs.get("patch_size"))


@dataclass
class H5Import:
    """What an import did: the store (None when no file could be imported: then nothing was written), the
    slides imported, and each refused file with why (its message names the file)."""

    store: EmbeddingStore | None
    imported: list[str] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def import_h5_files(in_dir: str | Path, url: str, encoder_name: str, storage_options: dict[str, Any] | None = None,
                    progress: Callable[[str], None] | None = None) -> H5Import:
    """Import every good .h5 file of a folder into a store; refuse each bad one (unreadable, NaN or overflowing
    features, a width other than the encoder's) without writing anything of it, and go on. The store is created
    with the first good file, so a folder of bad files leaves none behind. Unknown fingerprint fields say so."""
    files = sorted(p for p in Path(in_dir).glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise InteropError(f"no .h5 files in {in_dir}")
    expected = embedding_width(encoder_name)
    report = H5Import(store=None)
    dim, first = expected, ""
    for path in files:
        slide_id = path.stem
        try:
            validate_slide_id(slide_id)
            features, coords, coord_attrs, file_attrs = _read_h5(path)
            width = int(features.shape[1])
            if expected is not None and width != expected:
                raise InteropError(f"{path}: features are {width}-d but encoder {encoder_name} makes {expected}-d "
                                   "embeddings: name the encoder that made these features (--encoder)")
            if dim is not None and width != dim:
                raise InteropError(f"{path}: features are {width}-d but {first} set the store to {dim}-d")
            stored, coords = _checked_rows(path, features, coords)
        except (InteropError, InvalidSlideId) as e:
            report.refused.append((path, str(e) if str(e).startswith(str(path)) else f"{path}: {e}"))
            continue
        if report.store is None:
            dim, first = width, path.name
            report.store = EmbeddingStore.create_or_open(
                url, kind="slides", spec=_import_spec(encoder_name, width, coord_attrs),
                storage_options=storage_options, imported=True,
                config={"import_h5": str(in_dir), "encoder": encoder_name})
        try:
            _write_slide(report.store, path, stored, coords, coord_attrs, file_attrs)
        except (SlideWriteError, SlideBusy) as e:  # this slide only: the writer kept nothing of it
            report.refused.append((path, f"{path}: {e}"))
            continue
        report.imported.append(slide_id)
        if progress:
            progress(slide_id)
    return report


def import_h5(in_dir: str | Path, url: str, encoder_name: str, storage_options: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> EmbeddingStore:
    """Import a folder of per-slide .h5 files into a store (see import_h5_files); InteropError naming every
    refused file, raised after the good ones are imported."""
    report = import_h5_files(in_dir, url, encoder_name, storage_options, progress)
    if report.refused or report.store is None:
        raise InteropError(f"{len(report.refused)} of {len(report.refused) + len(report.imported)} .h5 files refused "
                           f"({len(report.imported)} imported): " + "; ".join(m for _, m in report.refused))
    return report.store


def _import_spec(encoder_name: str, dim: int, coord_attrs: dict[str, Any]) -> dict[str, Any]:
    target_mag = _positive(coord_attrs.get("target_magnification"))
    tile_px = _target_tile_px(coord_attrs)
    return {
        "encoder": {"name": encoder_name, "weights_id": UNKNOWN, "weights_sha256": UNKNOWN, "pooling": UNKNOWN,
                    "preprocessing": UNKNOWN, "dim": dim, "dtype": "float16"},
        "tiling": {"target_mpp": MPP_AT_1X / target_mag if target_mag else UNKNOWN,
                   "tile_px": int(tile_px) if tile_px else UNKNOWN, "stride_px": int(tile_px) if tile_px else UNKNOWN,
                   "tissue": UNKNOWN},
    }


def _write_slide(store: EmbeddingStore, path: Path, features: np.ndarray, coords: np.ndarray,
                 coord_attrs: dict[str, Any], file_attrs: dict[str, Any]) -> None:
    slide_id = path.stem
    level0_mag = _positive(coord_attrs.get("level0_magnification"))
    mpp = _positive(file_attrs.get("slidecache_mpp")) or (MPP_AT_1X / level0_mag if level0_mag else None)
    mpp_source = ("h5 slidecache_mpp" if file_attrs.get("slidecache_mpp")
                  else "h5 level0_magnification" if mpp else UNKNOWN)
    level0_side = _positive(coord_attrs.get("patch_size_level0"))
    attrs = {
        "source": {"path": str(path), "size": path.stat().st_size, "imported_from": "h5"},
        # TCGA barcodes give their patient (first 12 characters), as on every other path into a store
        "patient_id": patient_id_for(slide_id, str(file_attrs.get("slidecache_patient_id") or "") or None),
        "mpp": mpp,
        "mpp_source": mpp_source,
        "tile_px_level0": int(coord_attrs["patch_size_level0"]) if level0_side else None,
        "tissue": UNKNOWN,
        "imported": True,
    }
    with store.write_slide(slide_id, attrs, overwrite=True) as writer:
        if len(features):
            writer.append(coords, np.full(len(features), np.nan, np.float32), features)
        writer.commit(empty_reason=None if len(features) else "the .h5 file holds no tiles")
