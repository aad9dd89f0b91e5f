"""`python -m extract slide-embeddings`: every slide's slide embedding (PRISM, TITAN, Prov-GigaPath's slide encoder,
extract/slide_encoders/) computed from the tile features its store already holds, never opening a slide file, and
written into that store as a named set (store/slide_embeddings.py) with its own fingerprint: the slide encoder as
it describes itself (weights and their sha256 included) with the compute precision, and the store's fingerprint.

Resumable as extraction is: a rerun skips slides embedded from the tile rows the store holds now, recomputes a
slide whose tiles were written again since, and does not retry a slide that failed on those same rows unless
asked. One bad slide is recorded in the set and the rest go on."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from extract.slide_encoders import SlideEncoder, SlideEncoderSpec, build_slide_encoder
from slidecache.configs import shipped
from slidecache.devices import pick_device
from slidecache.errors import ConfigError, EncoderError, StoreSchemaError
from slidecache.slide_embeddings import slide_encoder_facts
from store.backends import display_url
from store.embedding_store import EmbeddingStore
from store.slide_embeddings import SlideEmbeddingSet
from store.slide_view import SlideView

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROGRESS_EVERY_S = 10.0


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: fp16 autocast on CUDA, as TRIDENT runs PRISM, TITAN and GigaPath's slide encoder (each model's
    `precision`); fp32 on the CPU, where half precision is slow and buys nothing."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast over fp32 weights at a resolved `precision`, as TRIDENT runs these models: norms and softmax stay
    in fp32; fp32 runs as it is."""
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision], enabled=precision != "fp32")


def set_spec(encoder: SlideEncoder, precision: str, tiles_fingerprint: str) -> dict[str, Any]:
    """What a set's fingerprint hashes: the slide encoder as it describes itself, run at `precision`, over the
    tile features of the store whose fingerprint is `tiles_fingerprint`."""
    return {"slide_encoder": {**encoder.describe(), "compute_precision": precision}, "tiles": tiles_fingerprint}


def _how_to_extract(spec: SlideEncoderSpec) -> str:
    """The command that makes the tile store a slide encoder reads, for a refusal message."""
    config = shipped("extract", f"{spec.tile_encoder}.yaml")
    settings = (f"--config configs/extract/{config.name}" if config.is_file() else
                f"--encoder {spec.tile_encoder} --config YAML (with tile_px: {spec.tile_px}, "
                f"target_mpp: {spec.target_mpp})")
    twin = (f"; a random-weight slide encoder also reads the random tile twin's features, no weights needed: add "
            f"`--encoder {spec.tile_encoder}-random`" if spec.weights is None else "")
    return (f"extract {spec.tile_encoder} features of {spec.tile_px} px tiles at {spec.target_mpp} µm/px into a "
            f"store of their own first (`python -m extract --cohort SLIDES --store NEW_STORE {settings}`) and run "
            f"this command on that store{twin}")


def check_tile_store(encoder: SlideEncoder, store: EmbeddingStore, any_tiling: bool = False) -> list[str]:
    """Refuse a store whose tile features the slide encoder cannot read (another tile encoder or width), or, unless
    `any_tiling`, whose tiles are not the card's size and magnification: the message names what the slide
    encoder needs, what the store holds and what to do. Returns the notes accepted with `any_tiling`."""
    if store.kind != "slides":
        raise StoreSchemaError(f"{display_url(store.url)} holds {store.kind}, not slides: slide encoders read the "
                               "tiles of whole-slide images")
    spec, tiles = store.spec, dict(store.spec.get("encoder", {}))
    facts = slide_encoder_facts(encoder.name)
    if facts and tiles.get("name") == facts.trident_tile_encoder:
        tiles["name"] = facts.tile_encoder  # TRIDENT's name for it, as `store import-h5 --encoder` may record it
    try:
        notes = encoder.check_tiles(tiles, spec.get("tiling", {}))
    except EncoderError as e:
        raise EncoderError(f"{display_url(store.url)}: {e}: {_how_to_extract(encoder.spec)}") from e
    if notes and not any_tiling:
        raise ConfigError(f"{display_url(store.url)}: {'; '.join(notes)}: {_how_to_extract(encoder.spec)}, or pass "
                          "--any-tiling to embed these tiles anyway (the set's fingerprint holds the store's)")
    return notes


def tile_spacing(slide: SlideView, tiling: Mapping[str, Any]) -> float | None:
    """The level-0 distance between neighbouring tiles' corners: the slide's tile side at level 0 (extraction
    records it; an .h5 import takes TRIDENT's patch_size_level0), else tile_px x target_mpp / mpp, times
    stride / tile size. None when the store cannot say."""
    tile_px, target_mpp, mpp = tiling.get("tile_px"), tiling.get("target_mpp"), slide.attrs.get("mpp")
    numbers = all(isinstance(v, (int, float)) and v > 0 for v in (tile_px, target_mpp, mpp))
    derived = tile_px * target_mpp / mpp if numbers else None  # type: ignore[operator]
    side = slide.attrs.get("tile_px_level0") or derived
    if not side or not isinstance(tile_px, (int, float)) or tile_px <= 0:
        return None
    stride = tiling.get("stride_px")
    return float(side) * (float(stride) / tile_px if isinstance(stride, (int, float)) and stride > 0 else 1.0)


class Status(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # embedded already, from the tile rows the store holds now
    EMPTY = "empty"  # a slide committed without tiles: nothing to embed
    FAILED = "failed"
    FAILED_BEFORE = "failed-before"  # failed on these same tile rows in an earlier run, not retried


@dataclass
class Outcome:
    slide_id: str
    status: Status
    tiles: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class SlideEmbeddingSummary:
    set_name: str
    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        """Slides without an embedding because of an error: in this run, or earlier and not retried."""
        return [o for o in self.outcomes if o.status in (Status.FAILED, Status.FAILED_BEFORE)]

    def table(self) -> str:
        wide = max([len("slide"), *(len(o.slide_id) for o in self.outcomes)])  # a TCGA id is never cut
        rows = [f"{'slide':<{wide}} {'status':<13} {'tiles':>7} {'s':>7}  error"]
        rows += [f"{o.slide_id:<{wide}} {o.status:<13} {o.tiles:>7} {o.seconds:>7.2f}  {o.error[:160]}"
                 for o in self.outcomes]
        done = self.count(Status.DONE)
        tiles = sum(o.tiles for o in self.outcomes if o.status == Status.DONE)
        rows.append(f"set {self.set_name} in {display_url(self.url)}: {done} embedded, {self.count(Status.SKIPPED)} "
                    f"already embedded, {self.count(Status.EMPTY)} without tiles, {self.count(Status.FAILED)} failed, "
                    f"{self.count(Status.FAILED_BEFORE)} failed before and not retried (--retry-failed); {tiles} "
                    f"tiles in {self.seconds:.1f} s ({done / max(self.seconds, 1e-9):.2f} slides/s)")
        return "\n".join(rows)


@dataclass
class SlideEmbeddingJob:
    """One run over one store: the options of `python -m extract slide-embeddings`."""

    store: str
    slide_encoder: str
    weights: str | None = None
    device: str = "auto"
    precision: str = "auto"
    set_name: str | None = None  # default: the slide encoder's name
    limit: int | None = None
    retry_failed: bool = False
    any_tiling: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def run(self) -> SlideEmbeddingSummary:
        started = time.perf_counter()
        device = pick_device(self.device)
        precision = resolve_precision(self.precision, device)
        store = EmbeddingStore.open(self.store, mode="a", storage_options=self.storage_options)
        # describe() and the checks from the meta device (a weights file hashed, not read): a refusal is quick
        described = build_slide_encoder(self.slide_encoder, self.weights, meta=True)
        notes = check_tile_store(described, store, self.any_tiling)
        name = self.set_name or described.name
        config = {"slide_encoder": self.slide_encoder, "weights": self.weights, "device": str(device),
                  "precision": precision, "tiling_notes": notes}
        emb_set = store.slide_embedding_set(name, spec=set_spec(described, precision, store.fingerprint),
                                            config=config)
        summary = SlideEmbeddingSummary(name, store.url)
        todo = self._plan(store, emb_set, summary)
        self.log(f"[slide-embeddings] {display_url(store.url)}: {len(todo)} slides to embed with {described.name} "
                 f"on {device} ({precision}) into set {name!r}; {len(summary.outcomes)} need nothing"
                 + "".join(f"\n[slide-embeddings] note: {n}" for n in notes))
        if todo:
            encoder = build_slide_encoder(self.slide_encoder, self.weights, device=device)
            self._embed_all(encoder, device, precision, store, emb_set, todo, summary)
        summary.seconds = time.perf_counter() - started
        return summary

    def _plan(self, store: EmbeddingStore, emb_set: SlideEmbeddingSet,
              summary: SlideEmbeddingSummary) -> list[SlideView]:
        """The slides to embed (at most `limit`); the outcomes of the others go into `summary`."""
        entries, failures = emb_set.entries(), emb_set.failures()
        todo = []
        for slide in store.slides():
            sid, commit = slide.slide_id, slide.commit_id
            if not slide.n_tiles:
                summary.outcomes.append(Outcome(sid, Status.EMPTY, error=str(slide.attrs.get("empty_reason") or "")))
            elif sid in entries and entries[sid].get("tile_commit") == commit:
                summary.outcomes.append(Outcome(sid, Status.SKIPPED, tiles=slide.n_tiles))
            elif sid in failures and failures[sid].get("tile_commit") == commit and not self.retry_failed:
                record = failures[sid]
                summary.outcomes.append(Outcome(sid, Status.FAILED_BEFORE, tiles=slide.n_tiles,
                                                error=f"{record.get('error_class')}: {record.get('message')}"))
            else:
                todo.append(slide)
        return todo if self.limit is None else todo[:self.limit]

    def _embed_all(self, encoder: SlideEncoder, device: torch.device, precision: str, store: EmbeddingStore,
                   emb_set: SlideEmbeddingSet, todo: list[SlideView], summary: SlideEmbeddingSummary) -> None:
        tiling = store.spec.get("tiling", {})
        t0 = last_report = time.perf_counter()
        done = failed = 0
        for slide, loaded in _read_ahead(todo):
            started = time.perf_counter()
            try:  # one bad slide (unreadable rows, tiles the model refuses, NaN out) is recorded; the rest go on
                features, coords = loaded.result()
                vector = self._embed_one(encoder, device, precision, slide, features, coords, tiling)
                emb_set.write(slide.slide_id, vector, tile_commit=slide.commit_id, n_tiles=slide.n_tiles,
                              attrs={"seconds": round(time.perf_counter() - started, 3), "device": device.type})
                summary.outcomes.append(Outcome(slide.slide_id, Status.DONE, slide.n_tiles,
                                                time.perf_counter() - started))
            except Exception as e:  # noqa: BLE001 (recorded with its class and traceback)
                emb_set.record_failure(slide.slide_id, e, slide.commit_id)
                text = f"{type(e).__name__}: {e}"
                summary.outcomes.append(Outcome(slide.slide_id, Status.FAILED, slide.n_tiles,
                                                time.perf_counter() - started, text))
                self.log(f"[slide-embeddings] FAILED: {slide.slide_id}: {text}")
                failed += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # after an out-of-memory slide, the next one gets the memory back
            done += 1
            now = time.perf_counter()
            if now - last_report >= PROGRESS_EVERY_S or done == len(todo):
                last_report = now
                rate = done / max(now - t0, 1e-9)
                eta = time.strftime("%H:%M:%S", time.gmtime((len(todo) - done) / rate)) if rate > 0 else "?"
                self.log(f"[slide-embeddings] progress: {done}/{len(todo)} slides ({failed} failed), "
                         f"{rate:.2f} slides/s, ETA {eta}")

    @staticmethod
    def _embed_one(encoder: SlideEncoder, device: torch.device, precision: str, slide: SlideView,
                   features: np.ndarray, coords: np.ndarray, tiling: Mapping[str, Any]) -> np.ndarray:
        spacing = tile_spacing(slide, tiling)
        if spacing is None and encoder.spec.positions:
            raise EncoderError(f"slide {slide.slide_id!r}: the store does not say how far apart its tiles are at "
                               f"level 0 (no tile_px_level0, mpp or tiling), and {encoder.name} places tiles by it: "
                               "extract the slide again, or import its tiles from an .h5 with patch_size_level0")
        with autocast(device, precision):
            vector = encoder.embed(features, coords, spacing or 1.0).numpy()  # PRISM ignores positions
        if not np.isfinite(vector).all():
            raise EncoderError(f"slide {slide.slide_id!r}: {encoder.name} gave NaN/Inf at {precision}; embed it at "
                               "fp32 (--precision fp32, into another --set: the precision is in the fingerprint)")
        return vector


def _read_ahead(slides: list[SlideView]) -> Iterator[tuple[SlideView, Future[tuple[np.ndarray, np.ndarray]]]]:
    """Each slide with its (features, coords) being read on a thread, the next slide's read started while this one
    is embedded: on object storage the read is most of a slide's time."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-read") as pool:
        upcoming = pool.submit(_read, slides[0]) if slides else None
        for i, slide in enumerate(slides):
            current, upcoming = upcoming, pool.submit(_read, slides[i + 1]) if i + 1 < len(slides) else None
            assert current is not None
            yield slide, current  # only two slides' rows are held at a time


def _read(slide: SlideView) -> tuple[np.ndarray, np.ndarray]:
    return slide.embeddings(), slide.coords()
