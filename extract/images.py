"""InternVL-format image datasets → an `images` store of per-tile patch-token grids, once.

The meta JSON (`{name: {root, annotation, ...}}`) names conversation jsonl files whose lines name images
under `root` (`"image": "a.jpg"` or a list). Each distinct image is cut with InternVL's dynamic tiling
(extract.dynamic_tiling), every tile is encoded by the frozen encoder, and the store keeps, per image,
the tiles' patch-token grids (class and register tokens dropped; average-pooled to a coarser grid when
asked) next to the usual class ‖ mean-patch embedding, with the tile layout in the image's attributes.
The images run on the same executors as slides (extract.stages): encoders built by the executor (Ray actors
or threads of the driver) cut, encode and write batches of images (extract.image_worker); the driver hands out
batches and counts. A rerun skips what is done; an unreadable or missing image is recorded, never fatal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from extract.config import ExtractConfig
from extract.image_worker import DynamicTiling, ImageEntry, ImageOutcome
from extract.stages import Executor
from slidecache.cohorts.ids import image_key
from slidecache.cohorts.meta import read_meta
from slidecache.errors import AnnotationError, EncoderError, StoreNotFound
from slidecache.jsonl import read_jsonl
from store.embedding_store import EmbeddingStore

DEATHS_PER_BATCH = 3  # a batch whose encoder died this often fails its images (as a poison chunk fails its slide)


def _images_of(row: dict[str, Any]) -> list[str]:
    value = row.get("image")
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def collect_images(meta_path: str | Path) -> list[ImageEntry]:
    """Every distinct image the annotations name, in first-seen order (read_meta refuses data_augment)."""
    entries: dict[str, ImageEntry] = {}
    for spec in read_meta(meta_path):
        if not spec.annotation.is_file():
            raise AnnotationError(f"dataset {spec.name!r}: annotation file {spec.annotation} does not exist")
        for line, row in read_jsonl(spec.annotation, AnnotationError):
            for image in _images_of(row):
                key = image_key(spec.name, image)
                if key not in entries:
                    entries[key] = ImageEntry(key, str(Path(spec.root) / image), f"{spec.annotation}, line {line}",
                                              spec.name, image)
    if not entries:
        raise AnnotationError(f"{meta_path}: no annotation line names an image (an 'image' key)")
    return list(entries.values())


def image_encoder_config(cfg: ExtractConfig) -> ExtractConfig:
    """Images keep patch-token grids: the full grid unless `tokens` asks for a coarser one."""
    from dataclasses import replace

    from extract.tile_encoders import patch_grid

    if cfg.tokens:
        return cfg
    grid = patch_grid(cfg.encoder)
    return replace(cfg, tokens=f"{grid}x{grid}")


@dataclass
class ImageSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    tiles: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{len(self.done)} images encoded ({self.tiles} tiles), {len(self.skipped)} already complete, "
                 f"{len(self.failed)} failed, in {self.seconds:.1f} s"]
        lines += [f"  failed: {key}: {message}" for key, message in self.failed]
        return "\n".join(lines)

    def add(self, outcome: ImageOutcome) -> None:
        if outcome.status == "done":
            self.done.append(outcome.key)
            self.tiles += outcome.tiles
        elif outcome.status == "skipped":
            self.skipped.append(outcome.key)
        else:
            self.failed.append((outcome.key, outcome.message))


class ImageExtraction:
    """Encode the images of `entries` into the `images` store at `store_url` (see module docstring), on
    `executor`, whose encoders are extract.image_worker.ImageEncoderWorker (Stages(worker=...))."""

    def __init__(self, entries: Sequence[ImageEntry], store_url: str, cfg: ExtractConfig, executor: Executor,
                 tiling: DynamicTiling = DynamicTiling(), batch_images: int = 8,
                 storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> None:
        self.entries, self.store_url, self.cfg, self.tiling = list(entries), store_url, cfg, tiling
        self.ex, self.batch_images, self.log = executor, batch_images, log
        self.storage_options = dict(storage_options or {})

    def run(self) -> ImageSummary:
        started = time.perf_counter()
        gpus = self.ex.gpus()
        self.cfg = self.cfg.for_device("cuda" if gpus else "cpu")
        complete = self._all_complete("cuda" if gpus else "cpu")
        if complete is not None:
            return complete
        resources = self.ex.resources()
        count = self.cfg.num_encoders or max(1, resources.gpus)
        actors = self.ex.start_encoders((self.cfg, self.store_url, self.storage_options), count, resources.gpus,
                                        resources.nodes)
        info = self.ex.get(self.ex.call(actors[0], "describe"))
        store = EmbeddingStore.create_or_open(self.store_url, kind="images", spec=self._spec(info["encoder"],
                                              info["token_shape"]), config=self.cfg.to_dict(),
                                              storage_options=self.storage_options)
        summary = ImageSummary()
        complete = {e.key for e in self.entries if store.is_complete(e.key)}  # one look per image (remote stores)
        todo = [e for e in self.entries if e.key not in complete]
        summary.skipped = [e.key for e in self.entries if e.key in complete]
        if summary.skipped:
            self.log(f"[images] {len(summary.skipped)} images already in the store: skipped")
        self._encode(store, todo, actors, summary, started)
        summary.seconds = time.perf_counter() - started
        return summary

    def _encode(self, store: EmbeddingStore, todo: list[ImageEntry], actors: list[Any], summary: ImageSummary,
                started: float) -> None:
        batches = [todo[i:i + self.batch_images] for i in range(0, len(todo), self.batch_images)]
        waiting = list(range(len(batches)))
        deaths = [0] * len(batches)
        idle = list(actors)
        # One batch at a time per encoder: a death is then its own batch's doing, never a batch queued behind it.
        pending: dict[Any, tuple[int, Any]] = {}
        while waiting or pending:
            while waiting and idle:
                actor, batch = idle.pop(0), waiting.pop(0)
                pending[self.ex.call(actor, "encode_images", batches[batch], self.tiling)] = (batch, actor)
            for ref in self.ex.wait(list(pending), timeout=1.0):
                batch, actor = pending.pop(ref)
                idle.append(actor)  # a dead encoder is restarted (Ray) and takes the next batch
                try:
                    outcomes = self.ex.get(ref)
                except Exception as e:
                    if not self.ex.actor_died(e):
                        raise
                    deaths[batch] += 1
                    if deaths[batch] < DEATHS_PER_BATCH:
                        waiting.append(batch)
                        continue
                    outcomes = [self._encoder_died(store, entry, deaths[batch]) for entry in batches[batch]]
                for outcome in outcomes:
                    summary.add(outcome)
                    if outcome.status == "failed":
                        self.log(f"[images] failed: {outcome.message}")
                self._progress(summary, len(todo), started)

    @staticmethod
    def _encoder_died(store: EmbeddingStore, entry: ImageEntry, deaths: int) -> ImageOutcome:
        error = EncoderError(f"{entry.path}: its encoder died {deaths} times encoding the batch holding it (named at "
                             f"{entry.source}); check the image, or run the others without it")
        store.record_failure(entry.key, error)
        return ImageOutcome(entry.key, "failed", message=str(error))

    def _progress(self, summary: ImageSummary, total: int, started: float) -> None:
        done = len(summary.done) + len(summary.failed)
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else float("nan")
        self.log(f"[images] {done}/{total} images ({len(summary.failed)} failed), {summary.tiles} tiles, "
                 f"{summary.tiles / elapsed:.1f} tiles/s, ETA {eta:.0f} s")

    def _spec(self, encoder: dict[str, Any], token_shape: Any) -> dict[str, Any]:
        return {"encoder": encoder, "tiling": self.tiling.describe(),
                "tokens": {"grid_shape": list(token_shape), "prefix_tokens_dropped": True}}

    def _all_complete(self, device: str) -> ImageSummary | None:
        """When the store already holds every image: the summary, with no encoder started (the fingerprint
        checked from the config, as extract/job.py does); else None."""
        from extract.inference import expected_encoder

        try:
            store = EmbeddingStore.open(self.store_url, storage_options=self.storage_options)
        except StoreNotFound:
            return None
        if store.kind != "images" or not all(store.is_complete(entry.key) for entry in self.entries):
            return None  # create_or_open refuses another kind; what is missing is encoded
        store.check_fingerprint(self._spec(*expected_encoder(self.cfg, device)))
        summary = ImageSummary(skipped=[entry.key for entry in self.entries])
        self.log(f"[images] {len(summary.skipped)} images already in the store: skipped (no encoder started)")
        return summary
