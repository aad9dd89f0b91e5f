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
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from store.embedding_store import EmbeddingStore
from store.errors import InteropError
from store.ids import patient_id_for
from store.provenance import UNKNOWN

MPP_AT_1X = 10.0  # the usual convention: 0.5 µm/px at 20x, 0.25 at 40x


def _json_safe(value: Any) -> str:
    return json.dumps(value, default=str)


def export_h5(store: EmbeddingStore, out_dir: str | Path, slide_ids: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write one TRIDENT-style .h5 per complete slide (features as float32, as those tools expect)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiling = store.spec.get("tiling", {})
    tile_px, target_mpp = tiling.get("tile_px"), tiling.get("target_mpp")
    written = []
    for slide_id in slide_ids or store.slide_ids():
        slide = store.slide(slide_id)
        mpp = slide.attrs.get("mpp")
        patch_level0 = slide.attrs.get("tile_px_level0")
        if patch_level0 is None and isinstance(tile_px, (int, float)) and isinstance(target_mpp, (int, float)) and mpp:
            patch_level0 = int(round(tile_px * target_mpp / float(mpp)))
        tmp = out / f".{slide_id}.h5.partial"
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(slide.n_tiles, slide.embedding_dim), dtype="float32")
            coords = f.create_dataset("coords", shape=(slide.n_tiles, 2), dtype="int64")
            for rows in slide.row_blocks():
                feats[rows] = slide.embeddings(rows).astype(np.float32)
                coords[rows] = slide.coords(rows)
            level0_side = int(patch_level0) if patch_level0 else -1
            size = slide.attrs.get("level0_size") or [-1, -1]
            patch_level, patch_size, downsample = _clam_patch(slide.attrs.get("tiling") or {}, tile_px, level0_side)
            coords.attrs.update({
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
                "name": slide_id,
                "level0_width": int(size[0]),
                "level0_height": int(size[1]),
            })
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
    if features.ndim == 3 and features.shape[0] == 1:  # some tools save (1, N, D)
        features = features[0]
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(features):
        raise InteropError(f"{path}: features {features.shape} and coords {coords.shape} do not pair up as (N, D) and (N, 2)")
    return features, coords, coord_attrs, file_attrs


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


def import_h5(in_dir: str | Path, url: str, encoder_name: str, storage_options: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> EmbeddingStore:
    """Import a folder of per-slide .h5 files into a store; unknown fingerprint fields say so."""
    files = sorted(p for p in Path(in_dir).glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise InteropError(f"no .h5 files in {in_dir}")
    first_features, _, first_coord_attrs, _ = _read_h5(files[0])
    dim = int(first_features.shape[1])
    target_mag = _positive(first_coord_attrs.get("target_magnification"))
    tile_px = _target_tile_px(first_coord_attrs)
    spec = {
        "encoder": {"name": encoder_name, "weights_id": UNKNOWN, "weights_sha256": UNKNOWN, "pooling": UNKNOWN,
                    "preprocessing": UNKNOWN, "dim": dim, "dtype": "float16"},
        "tiling": {"target_mpp": MPP_AT_1X / target_mag if target_mag else UNKNOWN,
                   "tile_px": int(tile_px) if tile_px else UNKNOWN, "stride_px": int(tile_px) if tile_px else UNKNOWN,
                   "tissue": UNKNOWN},
    }
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec, storage_options=storage_options,
                                          imported=True, config={"import_h5": str(in_dir), "encoder": encoder_name})
    for path in files:
        slide_id = path.stem
        features, coords, coord_attrs, file_attrs = _read_h5(path)
        if features.shape[1] != dim:
            raise InteropError(f"{path}: features are {features.shape[1]}-d but {files[0].name} set the store to {dim}-d")
        level0_mag = _positive(coord_attrs.get("level0_magnification"))
        mpp = _positive(file_attrs.get("slidecache_mpp")) or (MPP_AT_1X / level0_mag if level0_mag else None)
        attrs = {
            "source": {"path": str(path), "size": path.stat().st_size, "imported_from": "h5"},
            # TCGA barcodes give their patient (first 12 characters), as on every other path into a store
            "patient_id": patient_id_for(slide_id, str(file_attrs.get("slidecache_patient_id") or "") or None),
            "mpp": mpp,
            "mpp_source": "h5 slidecache_mpp" if file_attrs.get("slidecache_mpp") else ("h5 level0_magnification" if mpp else UNKNOWN),
            "tile_px_level0": int(coord_attrs["patch_size_level0"]) if _positive(coord_attrs.get("patch_size_level0")) else None,
            "tissue": UNKNOWN,
            "imported": True,
        }
        with store.write_slide(slide_id, attrs, overwrite=True) as writer:
            if len(features):
                writer.append(coords.astype(np.int64), np.full(len(features), np.nan, np.float32), features)
            writer.commit(empty_reason=None if len(features) else "the .h5 file holds no tiles")
        if progress:
            progress(slide_id)
    return store
