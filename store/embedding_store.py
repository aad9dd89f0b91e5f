"""The Zarr v3 embedding store: one group per slide, streamed writes, commit marker written last.

This module opens and creates stores and hands out their slides: listing, reading (store/slide_view.py),
writing (store/slide_writer.py), removal and failure records. The layout is in store/schema.py.

A slide is visible to readers only once its marker says `complete: true`; that attribute is written by
one atomic object write (rename on local disk, one PUT on object storage) after every array is written.
Each write owns its slide through a lease in the marker (store/lease.py), renewed while it writes and
checked before every append and at commit, and writes its arrays into a group of its own: two writers
of one slide never touch each other's arrays, a second writer meeting a live lease is refused
(SlideBusy), and a writer whose slide was taken over stops without keeping or deleting anything of the
other's. An overwrite keeps the old version readable until the new one commits. Writers of different
slides never touch the same object, so processes can write a store concurrently.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Collection, Iterator, Mapping

import numpy as np
import zarr
from zarr.errors import ContainsGroupError, GroupNotFoundError, NodeNotFoundError

from slidecache.cohorts.ids import patient_key, validate_slide_id
from slidecache.errors import (
    FingerprintMismatch,
    SlideBusy,
    SlideNotFound,
    SlideWriteError,
    StoreNotFound,
    StoreSchemaError,
)
from slidecache.provenance import fingerprint, provenance, spec_differences, utc_now
from slidecache.tile_embeddings import CLS_MEAN_PATCH, class_token_width
from store.backends import display_url, opening, zarr_store
from store.lease import DEFAULT_LEASE_SECONDS, Lease
from store.schema import (
    COMPLETE,
    DEFAULT_COMPRESSION,
    FAILURES,
    LEASE_ENV,
    SCHEMA_VERSION,
    SLIDES,
    WRITER,
    check_new_store,
    check_root_attrs,
)
from store.slide_embeddings import SlideEmbeddingSet, create_or_open_set, delete_set, open_set, set_names
from store.slide_view import SlideView
from store.slide_writer import SlideWriter

TRACEBACK_TAIL_LINES = 12


class EmbeddingStore:
    """An open store. Use `EmbeddingStore.open(url)` to read, `EmbeddingStore.create_or_open(...)` to write."""

    def __init__(self, root: zarr.Group, url: str, read_only: bool) -> None:
        self._root = root
        self.url = url
        self.read_only = read_only
        attrs = dict(root.attrs)
        check_root_attrs(attrs, url)
        if not read_only and attrs["schema_version"] != SCHEMA_VERSION:
            attrs["schema_version"] = SCHEMA_VERSION  # new slides are written in the schema-2 layout
            root.attrs.put(attrs)
        self._attrs = attrs
        self.lease_seconds = float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_SECONDS))

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> EmbeddingStore:
        """Open an existing store ('r' read-only, 'a' read-write). StoreNotFound when there is none."""
        read_only = mode == "r"
        with opening(url, storage_options):  # credentials, network, scheme: one error naming the URL
            try:
                root = zarr.open_group(zarr_store(url, read_only, dict(storage_options or {})),
                                       mode="r" if read_only else "r+")
            except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError) as e:
                raise StoreNotFound(f"no slidecache store at {display_url(url)}: check the path, or extract into it "
                                    "first") from e
            return cls(root, url, read_only)

    @classmethod
    def create_or_open(
        cls,
        url: str,
        *,
        kind: str,
        spec: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        imported: bool = False,
        compression: str = DEFAULT_COMPRESSION,
    ) -> EmbeddingStore:
        """Open a store for writing, creating it if absent; refuse one made with another fingerprint.

        `compression` ("zstd" or "none") applies when the store is created; an existing store keeps its own.
        """
        check_new_store(kind, compression)
        wanted = fingerprint(spec)
        with opening(url, storage_options):  # credentials, network, scheme: one error naming the URL
            backend = zarr_store(url, read_only=False, storage_options=dict(storage_options or {}))
            try:
                root = zarr.open_group(backend, mode="r+")
            except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError):
                root = zarr.create_group(backend, attributes={
                    "schema_version": SCHEMA_VERSION,
                    "kind": kind,
                    "fingerprint": wanted,
                    "fingerprint_spec": dict(spec),
                    "imported": imported,
                    "layout": {"compression": compression},
                    "provenance": provenance(config),
                })
                root.require_group(SLIDES)
                root.require_group(FAILURES)
                return cls(root, url, read_only=False)
            store = cls(root, url, read_only=False)
        if store.kind != kind:
            raise StoreSchemaError(f"{display_url(url)} holds {store.kind}, not {kind}: one kind per store")
        store.check_fingerprint(spec)
        return store

    def check_fingerprint(self, spec: Mapping[str, Any]) -> None:
        """Refuse a run whose encoder or tiling (`spec`) is not the one this store was made with."""
        wanted = fingerprint(spec)
        if self.fingerprint != wanted:
            diffs = "; ".join(spec_differences(spec, self.spec)) or "specs equal but hashes differ"
            raise FingerprintMismatch(
                f"refusing to write into {display_url(self.url)}: it was made with another encoder or tiling "
                f"(store {self.fingerprint[:12]}, this run {wanted[:12]}): {diffs}. "
                "Use a new store path, or the store's own settings."
            )

    # ---- root facts ----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._attrs["kind"]

    @property
    def fingerprint(self) -> str:
        return self._attrs["fingerprint"]

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self._attrs["fingerprint_spec"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._attrs.get("provenance", {}))

    @property
    def imported(self) -> bool:
        return bool(self._attrs.get("imported", False))

    @property
    def embedding_dim(self) -> int:
        return int(self.spec["encoder"]["dim"])

    @property
    def _class_token_width(self) -> int:
        """The leading values of a tile embedding that are the class token (0: the encoder has none)."""
        return class_token_width(self.spec["encoder"].get("pooling", CLS_MEAN_PATCH), self.embedding_dim)

    @property
    def compression(self) -> str:
        return str(self._attrs.get("layout", {}).get("compression", DEFAULT_COMPRESSION))

    @property
    def root_attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    # ---- listing -------------------------------------------------------------------------------

    def _slides_group(self) -> zarr.Group:
        return self._root.require_group(SLIDES) if not self.read_only else self._root[SLIDES]  # type: ignore[return-value]

    def slide_states(self) -> dict[str, bool]:
        """Every slide group present, complete or not (debris): {slide_id: complete}."""
        return {name: bool(group.attrs.get(COMPLETE, False)) for name, group in self._slides_group().groups()}

    def slide_ids(self) -> list[str]:
        """Complete slides only, sorted: what every reader may use."""
        return sorted(sid for sid, complete in self.slide_states().items() if complete)

    def slide_patients(self) -> dict[str, str]:
        """{slide: patient key} over the complete slides with tiles (what reports and references match)."""
        patients = {}
        for slide_id in self.slide_ids():
            slide = self.slide(slide_id)
            if slide.n_tiles:
                patients[slide_id] = patient_key(slide.patient_id)
        return patients

    def __contains__(self, slide_id: str) -> bool:
        return self.is_complete(slide_id)

    def __len__(self) -> int:
        return len(self.slide_ids())

    def slide_group(self, slide_id: str) -> zarr.Group:
        """The raw group of a slide, complete or not (for verify and repair). SlideNotFound if absent."""
        validate_slide_id(slide_id)
        try:
            return zarr.open_group(self._root.store, path=f"{SLIDES}/{slide_id}", mode="r")
        except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError) as e:
            raise SlideNotFound(f"slide {slide_id!r} is not in {display_url(self.url)}") from e

    def is_complete(self, slide_id: str) -> bool:
        try:
            return bool(self.slide_group(slide_id).attrs.get(COMPLETE, False))
        except SlideNotFound:
            return False

    def slide(self, slide_id: str) -> SlideView:
        """A complete slide, read lazily. SlideNotFound for absent or unfinished slides."""
        group = self.slide_group(slide_id)
        if not group.attrs.get(COMPLETE, False):
            raise SlideNotFound(f"slide {slide_id!r} in {display_url(self.url)} is not complete (interrupted write)")
        return SlideView(slide_id, group, self._class_token_width)

    def slides(self) -> Iterator[SlideView]:
        for slide_id in self.slide_ids():
            yield self.slide(slide_id)

    # ---- slide-embedding sets: one vector per slide, made from these tiles (store/slide_embeddings.py) ----

    def slide_embedding_sets(self) -> dict[str, SlideEmbeddingSet]:
        return {name: open_set(self._root, self, name) for name in set_names(self._root)}

    def slide_embedding_set(self, name: str, spec: Mapping[str, Any] | None = None,
                            config: Mapping[str, Any] | None = None, imported: bool = False) -> SlideEmbeddingSet:
        """The set `name`; given its `spec` (to write), created when absent, refused when made with another."""
        if spec is None:
            return open_set(self._root, self, name)
        return create_or_open_set(self._root, self, name, spec, config, imported)

    def slide_embeddings(self, name: str, current: bool = True) -> tuple[list[str], np.ndarray]:
        """(slide ids, float32 (n, E)) of set `name`, sorted; `current`: only embeddings made from the tile rows
        the store holds now (a slide extracted again since is left out until its embedding is recomputed)."""
        return self.slide_embedding_set(name).embeddings(current=current)

    def delete_slide_embedding_set(self, name: str) -> bool:
        self._require_writable()
        return delete_set(self._root, name)

    # ---- writing -------------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.read_only:
            raise SlideWriteError(f"{display_url(self.url)} was opened read-only")

    def write_slide(
        self,
        slide_id: str,
        attrs: Mapping[str, Any],
        *,
        token_shape: tuple[int, int] | None = None,
        overwrite: bool = False,
        block_rows: int | None = None,
        lease_seconds: float | None = None,
        lease_token: str | None = None,
        own_tokens: Collection[str] = (),
    ) -> SlideWriter:
        """Start writing one slide; the writer owns it through a lease until commit or abort.

        Debris of a dead writer (an incomplete slide whose lease expired or whose process is gone) is
        deleted first; a slide another live writer owns raises SlideBusy. A lease whose token is
        `lease_token` or in `own_tokens` is the caller's own, from a writer process it knows is gone (a
        restarted actor, a dead node): taken over at once, without waiting for the lease to run out. A complete slide is replaced
        only with overwrite=True, and stays readable until the new version commits. `token_shape` = (T, C)
        when token grids are stored. Use as a context manager: an exception inside removes what this writer
        wrote (and nothing else).
        """
        self._require_writable()
        validate_slide_id(slide_id)
        current, lease = self._marker_lease(slide_id)  # this slide only: listing every slide would be O(n^2)
        if current is not None:
            ours = lease is not None and lease.token in {lease_token, *own_tokens} - {None}
            if lease is not None and lease.alive() and not ours:
                raise SlideBusy(
                    f"slide {slide_id!r} in {display_url(self.url)} is being written by another writer "
                    f"({lease.describe()}), which will commit it; if that writer is gone, wait for its lease to "
                    f"expire or remove the slide with `python -m store rm --force`"
                )
            if current.get(COMPLETE) and not overwrite:
                raise SlideWriteError(
                    f"slide {slide_id!r} is already complete in {display_url(self.url)}; pass overwrite=True "
                    "(or `python -m store rm`) to replace it"
                )
            if not current.get(COMPLETE):
                self._delete_slide_group(slide_id)  # a dead writer's debris
                current = None
        return SlideWriter(self, slide_id, dict(attrs), token_shape=token_shape, block_rows=block_rows,
                           replaces=current, lease=Lease.new(lease_seconds or self.lease_seconds, lease_token))

    def delete_slide(self, slide_id: str, force: bool = False) -> bool:
        """Remove a slide (complete or debris) and its failure record; True if anything was there.

        A slide a live writer owns is refused (SlideBusy) unless `force`: that writer would then find its
        slide gone at its next append and stop.
        """
        self._require_writable()
        validate_slide_id(slide_id)
        _, lease = self._marker_lease(slide_id)
        if lease is not None and lease.alive() and not force:
            raise SlideBusy(f"slide {slide_id!r} is being written ({lease.describe()}); pass force=True "
                            "(`python -m store rm --force`) to remove it anyway")
        removed = self._delete_slide_group(slide_id)
        failures = self._root.require_group(FAILURES)
        if slide_id in failures:
            del failures[slide_id]
            removed = True
        return removed

    def abandon_slide(self, slide_id: str, tokens: Collection[str]) -> bool:
        """Remove an incomplete slide whose writer held one of `tokens` (the caller's own writers, whose
        processes died): True if removed. A complete slide, or one another writer holds, is left alone."""
        self._require_writable()
        current, lease = self._marker_lease(slide_id)
        if current is None or current.get(COMPLETE) or lease is None or lease.token not in set(tokens):
            return False
        return self._delete_slide_group(slide_id)

    def _delete_slide_group(self, slide_id: str) -> bool:
        slides = self._root.require_group(SLIDES)
        if slide_id in slides:
            del slides[slide_id]
            return True
        return False

    # ---- failures ------------------------------------------------------------------------------

    def record_failure(self, slide_id: str, error: BaseException, stage: str = "extract") -> dict[str, Any]:
        """Record (or count again) a slide's failure: error class, message, traceback tail, attempts."""
        self._require_writable()
        validate_slide_id(slide_id)
        failures = self._root.require_group(FAILURES)
        previous = self.failures().get(slide_id, {})
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        record = {
            "error_class": type(error).__name__,
            "message": str(error),
            "traceback_tail": "\n".join(tb.rstrip().splitlines()[-TRACEBACK_TAIL_LINES:]),
            "attempts": int(previous.get("attempts", 0)) + 1,
            "stage": stage,
            "last_attempt_at": utc_now(),
        }
        group = failures.require_group(slide_id)
        group.attrs.put(record)
        return record

    def failures(self) -> dict[str, dict[str, Any]]:
        try:
            failures = self._root[FAILURES]
        except KeyError:
            return {}
        return {name: dict(group.attrs) for name, group in failures.groups()}  # type: ignore[union-attr]

    def clear_failure(self, slide_id: str) -> None:
        self._require_writable()
        failures = self._root.require_group(FAILURES)
        if slide_id in failures:
            del failures[slide_id]

    # ---- internals for the writer ----------------------------------------------------------------

    def _marker_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """The slide marker's attributes as stored now (a fresh read), or None when there is no slide."""
        try:
            return dict(self.slide_group(slide_id).attrs)
        except SlideNotFound:
            return None

    def _marker_lease(self, slide_id: str) -> tuple[dict[str, Any] | None, Lease | None]:
        """(the marker's attributes, the lease of the writer holding the slide), each None when absent."""
        attrs = self._marker_attrs(slide_id)
        return attrs, Lease.from_attrs((attrs or {}).get(WRITER))

    def _put_marker(self, slide_id: str, attrs: Mapping[str, Any]) -> zarr.Group:
        """Write the marker's attributes, creating the group if needed; never deletes what is inside it."""
        try:
            group = zarr.open_group(self._root.store, path=f"{SLIDES}/{slide_id}", mode="r+")
        except (GroupNotFoundError, NodeNotFoundError, FileNotFoundError):
            try:
                return self._root.require_group(SLIDES).create_group(slide_id, attributes=dict(attrs))
            except ContainsGroupError:  # created by another writer a moment ago: the lease check decides
                group = zarr.open_group(self._root.store, path=f"{SLIDES}/{slide_id}", mode="r+")
        group.attrs.put(dict(attrs))
        return group
