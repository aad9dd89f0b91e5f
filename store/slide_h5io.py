"""A store's slide-embedding set ⇄ TRIDENT's slide features, `DIR/slide_features_<encoder>/<slide_id>.h5`.

The layout, as TRIDENT writes it (trident/wsi_objects/WSI.py `extract_slide_features`, through IO.py `save_h5`):
`features`, the slide embedding as float32 (E,), chunks of one value and growable, with the attributes `name`
(the slide) and `savetodir` (the folder); `coords`, the (N, 2) int64 level-0 corners of the tiles it was made
from, chunks of one row, with the attributes of the tile features' `coords` (patch_size_level0, magnifications,
...; store/h5io.py writes the same). `<encoder>` is TRIDENT's name of the slide encoder (titan, prism, gigapath:
slidecache.slide_embeddings). We add file attributes `slidecache_*`: the set's fingerprint and slide-encoder spec,
so an import of our own export gives the set back with its fingerprint.

An import goes into the store of the tile features the embeddings were made from (a set lives beside its tiles):
each file's slide must be complete there with the same tile corners, its width the slide encoder's, its values
finite; the store's tile encoder must be the one the slide encoder reads. A bad file is refused with why, the
good ones imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from slidecache.errors import (
    FingerprintMismatch,
    InteropError,
    InvalidSlideId,
    SlideNotFound,
    SlideWriteError,
    StoreNotFound,
)
from slidecache.provenance import UNKNOWN
from slidecache.slide_embeddings import reads_tile_encoder, slide_encoder_facts, trident_folder, trident_name
from store.backends import display_url
from store.embedding_store import EmbeddingStore
from store.h5io import coords_attrs
from store.slide_embeddings import SlideEmbeddingSet

FOLDER_PREFIX = "slide_features_"


def only_set(store: EmbeddingStore, name: str | None) -> SlideEmbeddingSet:
    """The set `name`, or the store's only set when no name is given (else a refusal naming them)."""
    if name:
        return store.slide_embedding_set(name)
    sets = store.slide_embedding_sets()
    if len(sets) != 1:
        raise SlideNotFound(f"{display_url(store.url)} holds {len(sets)} slide-embedding sets "
                            f"({', '.join(sets) or 'none'}): name one with --set")
    return next(iter(sets.values()))


def export_slide_h5(store: EmbeddingStore, out_dir: str | Path, set_name: str | None = None,
                    progress: Callable[[str], None] | None = None) -> tuple[Path, list[Path]]:
    """Write TRIDENT's slide_features_<encoder>/<slide_id>.h5 for every current embedding of a set; (the folder,
    the files written). Each file is written whole under a temporary name, then renamed."""
    emb_set = only_set(store, set_name)
    folder = Path(out_dir) / trident_folder(str(emb_set.slide_encoder.get("name", emb_set.name)))
    folder.mkdir(parents=True, exist_ok=True)
    slide_ids, vectors = emb_set.embeddings()
    written = []
    for slide_id, vector in zip(slide_ids, vectors):
        slide = store.slide(slide_id)
        tmp, path = folder / f".{slide_id}.h5.partial", folder / f"{slide_id}.h5"
        with h5py.File(tmp, "w") as f:
            # save_h5's datasets: chunks of one entry along the first axis, growable along it
            features = f.create_dataset("features", data=vector.astype(np.float32), chunks=(1,), maxshape=(None,))
            features.attrs.update({"name": slide_id, "savetodir": str(folder)})
            coords = slide.coords().astype(np.int64)
            dataset = f.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
            dataset.attrs.update(coords_attrs(store, slide))
            f.attrs.update({"slidecache_set": emb_set.name, "slidecache_set_fingerprint": emb_set.fingerprint,
                            "slidecache_slide_encoder": json.dumps(emb_set.slide_encoder, default=str),
                            "slidecache_tiles_fingerprint": store.fingerprint})
        tmp.replace(path)
        written.append(path)
        if progress:
            progress(slide_id)
    return folder, written


@dataclass
class SlideH5Import:
    """What an import did: the set (None when nothing was imported), the slides imported, the files skipped
    (TRIDENT's empty features of a slide without tiles) and each refused file with why."""

    set: SlideEmbeddingSet | None
    folder: Path
    imported: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def _folder(in_dir: Path, slide_encoder: str) -> Path:
    """The folder of the slide encoder's files: `in_dir` when it is a slide_features_* folder (its name checked),
    else in_dir/slide_features_<encoder> (TRIDENT's job folder), else in_dir itself."""
    names = {trident_name(slide_encoder), slide_encoder}
    if in_dir.name.startswith(FOLDER_PREFIX):
        found = in_dir.name.removeprefix(FOLDER_PREFIX)
        if found not in names:
            raise InteropError(f"{in_dir} holds slide embeddings of {found!r}, not of {slide_encoder} (TRIDENT "
                               f"names its folder {trident_folder(slide_encoder)}): name the slide encoder that made "
                               "them (--slide-encoder)")
        return in_dir
    inside = in_dir / trident_folder(slide_encoder)
    if inside.is_dir():
        return inside
    others = sorted(p.name for p in in_dir.glob(f"{FOLDER_PREFIX}*") if p.is_dir())
    if others:
        raise InteropError(f"{in_dir} has no {trident_folder(slide_encoder)} but {', '.join(others)}: name the slide "
                           "encoder that made them (--slide-encoder), or give that folder")
    return in_dir


def _read(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise InteropError(f"{path}: a TRIDENT slide-features file needs a dataset 'features', found {list(f)}")
            features = np.asarray(f["features"][...])
            coords = np.asarray(f["coords"][...]) if "coords" in f else None
            return features, coords, dict(f.attrs)
    except OSError as e:
        raise InteropError(f"{path}: not a readable HDF5 file ({e})") from e


def _spec_part(path: Path, attrs: dict[str, Any], slide_encoder: str, width: int) -> dict[str, Any]:
    """The set's slide-encoder part: our own export's, else what an import knows (its weights are unknown)."""
    text = attrs.get("slidecache_slide_encoder")
    if text:
        part = json.loads(text)
        if part.get("name") != slide_encoder:
            raise InteropError(f"{path}: made by {part.get('name')}, not {slide_encoder} (its slidecache_slide_encoder "
                               "attribute): name the slide encoder that made it (--slide-encoder)")
        return dict(part)
    facts = slide_encoder_facts(slide_encoder)
    return {"name": slide_encoder, "weights_id": UNKNOWN, "weights_sha256": UNKNOWN,
            "tile_encoder": facts.tile_encoder if facts else UNKNOWN, "dim": width,
            "source": "TRIDENT slide_features h5"}


def import_slide_h5(in_dir: str | Path, url: str, slide_encoder: str, set_name: str | None = None,
                    storage_options: dict[str, Any] | None = None,
                    progress: Callable[[str], None] | None = None) -> SlideH5Import:
    """Import TRIDENT slide-feature files into a set of the store holding their tile features (see the module
    docstring for what is checked). The set is created with the first good file, so refused files leave none."""
    folder = _folder(Path(in_dir), slide_encoder)
    files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise InteropError(f"no .h5 files in {folder}")
    try:
        store = EmbeddingStore.open(url, mode="a", storage_options=storage_options)
    except StoreNotFound as e:
        raise StoreNotFound(f"{e}. A slide-embedding set lives in the store of its tile features: import those "
                            "first (`python -m store import-h5 DIR STORE --encoder NAME`)") from e
    tiles = store.spec.get("encoder", {})
    facts = slide_encoder_facts(slide_encoder)
    if facts and (not reads_tile_encoder(slide_encoder, str(tiles.get("name"))) or tiles.get("dim") != facts.tile_dim):
        raise InteropError(f"{slide_encoder} reads {facts.tile_encoder} tile features ({facts.tile_dim}-d); "
                           f"{display_url(url)} holds {tiles.get('name')} features ({tiles.get('dim')}-d): import "
                           f"into the store of the {facts.tile_encoder} features these embeddings were made from")
    report = SlideH5Import(set=None, folder=folder)
    spec_part: dict[str, Any] | None = None
    for path in files:
        slide_id = path.stem
        try:
            features, coords, attrs = _read(path)
            vector = features.reshape(-1) if features.ndim == 2 and features.shape[0] == 1 else features
            if vector.size == 0:
                report.skipped.append((path, "no slide embedding (TRIDENT's file for a slide without tiles)"))
                continue
            if vector.ndim != 1:
                raise InteropError(f"{path}: features {features.shape} are not one slide embedding (E,)")
            if facts and len(vector) != facts.dim:
                raise InteropError(f"{path}: a {len(vector)}-d slide embedding, but {slide_encoder} makes "
                                   f"{facts.dim}-d ones: name the slide encoder that made it (--slide-encoder)")
            if not np.isfinite(vector.astype(np.float64)).all():
                raise InteropError(f"{path}: the slide embedding holds NaN/Inf")
            part = _spec_part(path, attrs, slide_encoder, len(vector))
            if spec_part is not None and part != spec_part:
                raise InteropError(f"{path}: made by another slide encoder or weights than the files before it "
                                   f"({json.dumps(part, default=str)[:200]}); import it into another set (--set)")
            try:
                slide = store.slide(slide_id)
            except SlideNotFound as e:
                raise InteropError(f"{path}: {e}: import its tile features first (`python -m store import-h5`)") from e
            if coords is not None and not _same_rows(coords, slide.coords()):
                raise InteropError(f"{path}: made from {len(coords)} tiles, not the {slide.n_tiles} tiles "
                                   f"{display_url(url)} holds for slide {slide_id!r}: import into the store of the "
                                   "tiles it was made from")
            if report.set is None:
                spec_part = part
                report.set = store.slide_embedding_set(set_name or slide_encoder, imported=True,
                                                       spec={"slide_encoder": part, "tiles": store.fingerprint},
                                                       config={"import_slide_h5": str(folder)})
            report.set.write(slide_id, vector, tile_commit=slide.commit_id, n_tiles=slide.n_tiles,
                             attrs={"source": {"path": str(path), "imported_from": "TRIDENT slide_features h5"}})
        except FingerprintMismatch:
            raise  # the set holds another slide encoder's embeddings: no file can go in
        except (InteropError, InvalidSlideId, SlideWriteError, ValueError) as e:
            message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            report.refused.append((path, message))
            continue
        report.imported.append(slide_id)
        if progress:
            progress(slide_id)
    return report


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """The same tile corners, in any order."""
    a, b = np.asarray(a).reshape(-1, 2), np.asarray(b).reshape(-1, 2)
    if a.shape != b.shape:
        return False
    order = lambda x: x[np.lexsort((x[:, 1], x[:, 0]))].astype(np.int64)  # noqa: E731
    return bool(np.array_equal(order(a), order(b)))
