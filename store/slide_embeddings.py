"""Slide-embedding sets: one vector per slide, computed from a store's own tile features and kept inside that store,
so every later stage reads it from where the tiles are (`EmbeddingStore.slide_embeddings(name)`).

Layout, beside `slides/` and `failures/` (store/schema.py):
    slide_embeddings/<set>/      attrs: kind, name, fingerprint = sha256 of fingerprint_spec {slide_encoder: what
                                 changes its numbers (name, weights and their sha256, positions, output, dim,
                                 compute precision), tiles: the store's own fingerprint}, provenance, imported
      slides/<slide_id>/         the marker. attrs: tile_commit (the SlideView.commit_id of the tile rows it was
                                 made from), n_tiles, embedding_dim, fingerprint, seconds, `data`; `complete` LAST
        v-<token>  float32 (E,)  the slide embedding, in an array named after its write
      failures/<slide_id>        attrs: error_class, message, traceback_tail, attempts, tile_commit, last_attempt_at

A slide's embedding is written whole, then its marker (one object write) names it and says complete; a write
that dies before leaves no marker a reader could take. An embedding whose slide's tiles were written again since
(another commit) or removed is stale: readers leave it out, and the next run recomputes it. This module takes
plain arrays and dicts: the slide encoders that make the vectors are extract's (the layer above).
"""

from __future__ import annotations

import secrets
import traceback
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import zarr

from slidecache.cohorts.ids import validate_slide_id
from slidecache.errors import FingerprintMismatch, SlideNotFound, SlideWriteError, StoreSchemaError
from slidecache.provenance import fingerprint, provenance, spec_differences, utc_now
from store.backends import display_url
from store.schema import COMPLETE, DATA, ZSTD
from store.slide_view import SlideView

SETS, SET_SLIDES, SET_FAILURES = "slide_embeddings", "slides", "failures"
KIND = "slide_embeddings"
TRACEBACK_TAIL_LINES = 12


class TileStore(Protocol):
    """What a set uses of the store holding it (an EmbeddingStore): a protocol, because that store's module
    imports this one to hand out its sets."""

    url: str
    read_only: bool

    @property
    def fingerprint(self) -> str: ...

    def slide(self, slide_id: str) -> SlideView: ...


def _sets_group(root: zarr.Group, create: bool) -> zarr.Group | None:
    if create:
        return root.require_group(SETS)
    try:
        return root[SETS]  # type: ignore[return-value]
    except KeyError:
        return None


def set_names(root: zarr.Group) -> list[str]:
    group = _sets_group(root, create=False)
    return sorted(name for name, _ in group.groups()) if group is not None else []


def open_set(root: zarr.Group, tiles: TileStore, name: str) -> SlideEmbeddingSet:
    """The set `name` of a store; SlideNotFound naming the sets there when it has none of that name."""
    group = _sets_group(root, create=False)
    if group is None or name not in group:
        names = set_names(root)
        raise SlideNotFound(f"no slide-embedding set {name!r} in {display_url(tiles.url)} (sets: "
                            f"{', '.join(names) or 'none'}); make it with `python -m extract slide-embeddings "
                            f"--store {display_url(tiles.url)} --slide-encoder NAME`")
    return SlideEmbeddingSet(group[name], tiles, name)  # type: ignore[arg-type]


def create_or_open_set(root: zarr.Group, tiles: TileStore, name: str, spec: Mapping[str, Any],
                       config: Mapping[str, Any] | None = None, imported: bool = False) -> SlideEmbeddingSet:
    """Open the set `name` for writing, creating it when absent; refuse one made with another fingerprint, naming
    both slide encoders and what to do. `spec["tiles"]` must be this store's fingerprint."""
    validate_slide_id(name)  # a set name is a key as a slide id is: no separators, no '..'
    if tiles.read_only:
        raise SlideWriteError(f"{display_url(tiles.url)} was opened read-only")
    if spec.get("tiles") != tiles.fingerprint:
        raise FingerprintMismatch(f"a slide-embedding set of {display_url(tiles.url)} is made from its own tiles "
                                  f"(fingerprint {tiles.fingerprint[:12]}), not from {str(spec.get('tiles'))[:12]}")
    sets = _sets_group(root, create=True)
    assert sets is not None
    if name in sets:
        existing = SlideEmbeddingSet(sets[name], tiles, name)  # type: ignore[arg-type]
        existing.check_fingerprint(spec)
        return existing
    group = sets.create_group(name, attributes={
        "kind": KIND, "name": name, "fingerprint": fingerprint(spec), "fingerprint_spec": dict(spec),
        "imported": imported, "provenance": provenance(config)})
    group.require_group(SET_SLIDES)
    group.require_group(SET_FAILURES)
    return SlideEmbeddingSet(group, tiles, name)


def delete_set(root: zarr.Group, name: str) -> bool:
    """Remove a set and everything in it; False when there is none of that name."""
    validate_slide_id(name)
    sets = _sets_group(root, create=False)
    if sets is None or name not in sets:
        return False
    del sets[name]
    return True


def _describe(slide_encoder: Mapping[str, Any]) -> str:
    return (f"{slide_encoder.get('name', '?')} (weights {slide_encoder.get('weights_id', '?')}, "
            f"{slide_encoder.get('compute_precision', 'precision unknown')})")


class SlideEmbeddingSet:
    """One named set of slide embeddings in a store: read by slide or as one (n, E) array, written slide by slide."""

    def __init__(self, group: zarr.Group, tiles: TileStore, name: str) -> None:
        self._group = group
        self.tiles = tiles
        self.name = name
        self.attrs: dict[str, Any] = dict(group.attrs)
        if self.attrs.get("kind") != KIND:
            raise StoreSchemaError(f"{display_url(tiles.url)}: {SETS}/{name} is not a slide-embedding set "
                                   f"(kind={self.attrs.get('kind')!r})")

    def __repr__(self) -> str:
        return f"SlideEmbeddingSet({self.name!r}, {self.slide_encoder.get('name')}, dim={self.dim})"

    # ---- facts ---------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.attrs["fingerprint_spec"])

    @property
    def slide_encoder(self) -> dict[str, Any]:
        return dict(self.spec.get("slide_encoder", {}))

    @property
    def dim(self) -> int:
        return int(self.slide_encoder["dim"])

    @property
    def imported(self) -> bool:
        return bool(self.attrs.get("imported", False))

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.attrs.get("provenance", {}))

    def check_fingerprint(self, spec: Mapping[str, Any]) -> None:
        """Refuse a run whose slide encoder (or tiles) is not the one this set was made with, naming both."""
        wanted = fingerprint(spec)
        if wanted == self.fingerprint:
            return
        diffs = "; ".join(spec_differences(spec, self.spec)) or "specs equal but hashes differ"
        ours = dict(spec.get("slide_encoder", {}))
        raise FingerprintMismatch(
            f"refusing to write into slide-embedding set {self.name!r} of {display_url(self.tiles.url)}: it holds "
            f"{_describe(self.slide_encoder)}, fingerprint {self.fingerprint[:12]}; this run is {_describe(ours)}, "
            f"fingerprint {wanted[:12]} ({diffs}). Give this run another set name (--set), or remove the old set "
            f"(`python -m store rm-slide-embeddings {display_url(self.tiles.url)} {self.name}`)")

    # ---- reading -------------------------------------------------------------------------------

    def _slides(self) -> zarr.Group:
        return self._group[SET_SLIDES]  # type: ignore[return-value]

    def states(self) -> dict[str, bool]:
        """Every slide entry present, complete or not (a write that died): {slide_id: complete}."""
        return {sid: bool(g.attrs.get(COMPLETE, False)) for sid, g in self._slides().groups()}

    def entries(self) -> dict[str, dict[str, Any]]:
        """{slide_id: marker attributes} of the complete entries, current or stale, in one listing."""
        return {sid: dict(g.attrs) for sid, g in sorted(self._slides().groups()) if g.attrs.get(COMPLETE)}

    def tile_commit(self, slide_id: str) -> str | None:
        """The commit id of the slide's tile rows in the store now; None when the slide is not (complete) there."""
        try:
            return self.tiles.slide(slide_id).commit_id
        except SlideNotFound:
            return None

    def stale(self) -> dict[str, str]:
        """{slide_id: why} of the complete entries made from tile rows the store no longer holds."""
        out = {}
        for slide_id, attrs in self.entries().items():
            now = self.tile_commit(slide_id)
            if now is None:
                out[slide_id] = "its slide is no longer complete in the store"
            elif now != attrs.get("tile_commit"):
                out[slide_id] = "its slide's tiles were written again since"
        return out

    def slide_ids(self, current: bool = True) -> list[str]:
        """The slides with an embedding, sorted; `current`: only those made from the tile rows the store holds."""
        if not current:
            return list(self.entries())
        return [s for s, attrs in self.entries().items() if self.tile_commit(s) == attrs.get("tile_commit")]

    def slide_array(self, slide_id: str, attrs: Mapping[str, Any]) -> zarr.Array:
        """The stored array a complete marker (`attrs`) names (for verify: its shape and dtype as stored)."""
        return self._slides()[slide_id][str(attrs[DATA])]  # type: ignore[return-value,index]

    def _read(self, slide_id: str, attrs: Mapping[str, Any]) -> np.ndarray:
        return self.slide_array(slide_id, attrs)[...]  # type: ignore[return-value]

    def embedding(self, slide_id: str) -> np.ndarray:
        """One slide's embedding, float32 (E,). SlideNotFound when it has none (or an unfinished one)."""
        validate_slide_id(slide_id)
        attrs = self.entries_of([slide_id]).get(slide_id)
        if attrs is None:
            raise SlideNotFound(f"slide {slide_id!r} has no embedding in set {self.name!r} of "
                                f"{display_url(self.tiles.url)}")
        return self._read(slide_id, attrs)

    def entries_of(self, slide_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The complete markers of these slides only (no listing of the whole set)."""
        out = {}
        slides = self._slides()
        for slide_id in slide_ids:
            if slide_id in slides:
                attrs = dict(slides[slide_id].attrs)
                if attrs.get(COMPLETE):
                    out[slide_id] = attrs
        return out

    def embeddings(self, slide_ids: Sequence[str] | None = None, current: bool = True) -> tuple[list[str], np.ndarray]:
        """(slide ids, float32 (n, E)) in the order asked (default: every slide with a current embedding, sorted).
        Asked slides without a (current) embedding raise SlideNotFound naming them."""
        if slide_ids is None:
            entries = self.entries()
            ids = [s for s in entries if not current or self.tile_commit(s) == entries[s].get("tile_commit")]
        else:
            ids = list(slide_ids)
            entries = self.entries_of(ids)
            missing = [s for s in ids if s not in entries
                       or (current and self.tile_commit(s) != entries[s].get("tile_commit"))]
            if missing:
                raise SlideNotFound(f"set {self.name!r} of {display_url(self.tiles.url)} has no "
                                    f"{'current ' if current else ''}embedding of {len(missing)} slide(s): "
                                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; rerun "
                                    "`python -m extract slide-embeddings` on the store")
        if not ids:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        return ids, np.stack([self._read(s, entries[s]) for s in ids]).astype(np.float32, copy=False)

    # ---- writing -------------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.tiles.read_only:
            raise SlideWriteError(f"{display_url(self.tiles.url)} was opened read-only")

    def write(self, slide_id: str, vector: np.ndarray, *, tile_commit: str | None, n_tiles: int,
              attrs: Mapping[str, Any] | None = None) -> None:
        """Store one slide's embedding: the vector first, then its marker (complete) naming it, then the version
        it replaced is removed. The old version stays readable until the marker is written."""
        self._require_writable()
        validate_slide_id(slide_id)
        vec = np.asarray(vector)
        if vec.shape != (self.dim,):
            raise SlideWriteError(f"slide {slide_id!r}: a slide embedding of set {self.name!r} is ({self.dim},), got "
                                  f"{vec.shape}")
        vec = vec.astype(np.float32)
        if not np.isfinite(vec).all():
            raise SlideWriteError(f"slide {slide_id!r}: the slide embedding holds NaN/Inf; nothing was written")
        group = self._slides().require_group(slide_id)
        replaced = group.attrs.get(DATA)
        data = f"v-{secrets.token_hex(8)}"
        group.create_array(data, data=vec, chunks=vec.shape, compressors=ZSTD)
        group.attrs.put({**(attrs or {}), "tile_commit": tile_commit, "n_tiles": int(n_tiles),
                         "embedding_dim": self.dim, "fingerprint": self.fingerprint, "committed_at": utc_now(),
                         DATA: data, COMPLETE: True})  # the marker: one object write, after the vector
        if replaced and replaced != data and replaced in group:
            del group[replaced]  # only the version this write replaced: another writer's array is never touched
        self.clear_failure(slide_id)

    def failures(self) -> dict[str, dict[str, Any]]:
        return {sid: dict(g.attrs) for sid, g in self._group[SET_FAILURES].groups()}  # type: ignore[union-attr]

    def record_failure(self, slide_id: str, error: BaseException, tile_commit: str | None) -> dict[str, Any]:
        """Record (or count again) a slide's failure in this set, with the tile rows it was tried on."""
        self._require_writable()
        validate_slide_id(slide_id)
        group = self._group.require_group(SET_FAILURES).require_group(slide_id)
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        record = {"error_class": type(error).__name__, "message": str(error),
                  "traceback_tail": "\n".join(tb.rstrip().splitlines()[-TRACEBACK_TAIL_LINES:]),
                  "attempts": int(dict(group.attrs).get("attempts", 0)) + 1, "tile_commit": tile_commit,
                  "last_attempt_at": utc_now()}
        group.attrs.put(record)
        return record

    def clear_failure(self, slide_id: str) -> None:
        failures = self._group.require_group(SET_FAILURES)
        if slide_id in failures:
            del failures[slide_id]
