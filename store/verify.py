"""Check a store end to end: shapes, dtypes, NaN/Inf, commit markers, pooled vectors, fingerprints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from slidecache.errors import StoreError
from slidecache.provenance import fingerprint
from store.embedding_store import EmbeddingStore
from store.lease import Lease
from store.schema import DATA, WRITER, data_group
from store.slide_embeddings import SlideEmbeddingSet

SET_PROBLEM = "slide-embedding set "  # how a set's problems begin
POOLED_TOLERANCE = 1e-2  # pooled_mean is computed in float64 from the float16 rows; this is rounding slack


@dataclass(frozen=True)
class Problem:
    slide_id: str | None  # None: the store as a whole
    severity: str  # "error" (verify fails) or "warning"
    message: str

    def __str__(self) -> str:
        where = f"slide {self.slide_id}" if self.slide_id else "store"
        return f"{self.severity}: {where}: {self.message}"


def _check_slide(store: EmbeddingStore, slide_id: str) -> list[Problem]:
    problems: list[Problem] = []

    def err(msg: str) -> None:
        problems.append(Problem(slide_id, "error", msg))

    group = store.slide_group(slide_id)
    attrs = dict(group.attrs)
    if attrs.get("fingerprint") != store.fingerprint:
        err(f"written under fingerprint {str(attrs.get('fingerprint'))[:12]}, store has {store.fingerprint[:12]}")
    n = attrs.get("n_tiles")
    if not isinstance(n, int) or n < 0:
        err(f"n_tiles attribute is {n!r}")
        return problems
    if n == 0 and not attrs.get("empty_reason"):
        err("0 tiles and no empty_reason")
    dim = store.embedding_dim
    expected = {"coords": ((n, 2), "int32"), "tissue": ((n,), "float16"), "embeddings": ((n, dim), None)}
    if attrs.get("has_tokens"):
        t, c = attrs.get("token_shape") or (None, None)
        expected["tokens"] = ((n, t, c), None)
    if n:
        expected["pooled_mean"] = ((dim,), "float32")
        expected["pooled_max"] = ((dim,), "float32")
    arrays = dict(data_group(group, attrs).arrays())
    for name, (shape, dtype) in expected.items():
        if name not in arrays:
            err(f"committed but array {name!r} is missing")
            continue
        a = arrays[name]
        if tuple(a.shape) != shape:
            err(f"{name} has shape {tuple(a.shape)}, expected {shape}")
        if dtype and str(a.dtype) != dtype:
            err(f"{name} has dtype {a.dtype}, expected {dtype}")
    if problems or n == 0:
        return problems
    slide = store.slide(slide_id)
    total = np.zeros(dim, dtype=np.float64)
    for rows in slide.row_blocks():
        block = slide.embeddings(rows)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            err(f"embedding row {rows.start + int(np.argmax(bad))} is NaN/Inf ({int(bad.sum())} rows in block {rows.start}-{rows.stop})")
            return problems
        total += block.astype(np.float64).sum(axis=0)
        if slide.has_tokens and not np.isfinite(slide.tokens(rows)).all():
            err(f"token grids in rows {rows.start}-{rows.stop} hold NaN/Inf")
    coords = slide.coords()
    if (coords < 0).any():
        err("negative coordinates")
    tissue = slide.tissue().astype(np.float32)
    known = tissue[~np.isnan(tissue)]
    if attrs.get("tissue") != "unknown" and len(known) != n:
        err("tissue fractions hold NaN although the slide was not imported")
    if ((known < 0) | (known > 1)).any():
        err("tissue fractions outside [0, 1]")
    pooled = slide.pooled("mean")
    if not np.isfinite(pooled).all() or np.abs(pooled - total / n).max() > POOLED_TOLERANCE:
        err("pooled_mean does not equal the mean of the embeddings")
    return problems


def verify_store(store: EmbeddingStore, progress: Callable[[str], None] | None = None) -> list[Problem]:
    """Every problem found; an empty list means the store is sound."""
    problems: list[Problem] = []
    if fingerprint(store.spec) != store.fingerprint:
        problems.append(Problem(None, "error", "root fingerprint does not match the hash of fingerprint_spec"))
    states = store.slide_states()
    for slide_id, complete in sorted(states.items()):
        if not complete:
            lease = Lease.from_attrs(store.slide_group(slide_id).attrs.get(WRITER))
            if lease is not None and lease.alive():
                problems.append(Problem(slide_id, "warning", f"being written ({lease.describe()}); invisible to "
                                                             "readers until that writer commits it"))
            else:
                problems.append(Problem(slide_id, "warning",
                                        "incomplete (an interrupted write); invisible to readers, replaced by the next "
                                        "extraction of this slide, or remove it with `python -m store rm`"))
            continue
        try:
            problems += _check_slide(store, slide_id)
        except (StoreError, KeyError, ValueError, OSError) as e:
            problems.append(Problem(slide_id, "error", f"unreadable: {type(e).__name__}: {e}"))
        if progress:
            progress(slide_id)
    for slide_id in store.failures():
        if states.get(slide_id, False):
            problems.append(Problem(slide_id, "warning", "complete, yet a failure record remains"))
    for emb_set in store.slide_embedding_sets().values():
        problems += verify_slide_embeddings(store, emb_set)
    return problems


def verify_slide_embeddings(store: EmbeddingStore, emb_set: SlideEmbeddingSet) -> list[Problem]:
    """A slide-embedding set: its fingerprint (its own hash, made from this store's tiles), each embedding's
    marker, shape, dtype and values, and whether the tile rows it was made from are still the store's."""
    where = f"{SET_PROBLEM}{emb_set.name}"
    problems = []

    def add(slide_id: str | None, severity: str, message: str) -> None:
        problems.append(Problem(slide_id, severity, f"{where}: {message}"))

    if fingerprint(emb_set.spec) != emb_set.fingerprint:
        add(None, "error", "its fingerprint does not match the hash of its fingerprint_spec")
    if emb_set.spec.get("tiles") != store.fingerprint:
        add(None, "error", f"made from tiles of fingerprint {str(emb_set.spec.get('tiles'))[:12]}, the store's is "
                           f"{store.fingerprint[:12]}")
    for slide_id, complete in sorted(emb_set.states().items()):
        if not complete:
            add(slide_id, "warning", "an unfinished write (no marker): invisible to readers, replaced by the next run")
    stale = emb_set.stale()
    for slide_id, attrs in emb_set.entries().items():
        if attrs.get("fingerprint") != emb_set.fingerprint:
            add(slide_id, "error", f"written under fingerprint {str(attrs.get('fingerprint'))[:12]}, the set has "
                                   f"{emb_set.fingerprint[:12]}")
        try:
            array = emb_set.slide_array(slide_id, attrs)
        except (KeyError, StoreError, OSError) as e:
            add(slide_id, "error", f"marked complete but its embedding {attrs.get(DATA)!r} is unreadable "
                                   f"({type(e).__name__}: {e})")
            continue
        if tuple(array.shape) != (emb_set.dim,) or str(array.dtype) != "float32":
            add(slide_id, "error",
                f"embedding is {array.dtype} {tuple(array.shape)}, expected float32 ({emb_set.dim},)")
        elif not np.isfinite(array[...]).all():
            add(slide_id, "error", "embedding holds NaN/Inf")
        if slide_id in stale:
            add(slide_id, "warning", f"stale: {stale[slide_id]}; readers leave it out until "
                                     "`python -m extract slide-embeddings` recomputes it")
    return problems
