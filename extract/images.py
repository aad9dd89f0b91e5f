"""InternVL-format image datasets → an `images` store of per-tile patch-token grids, once.

The meta JSON (`{name: {root, annotation, ...}}`) names conversation jsonl files whose lines name images
under `root` (`"image": "a.jpg"` or a list). Each distinct image is cut with InternVL's dynamic tiling
(extract.dynamic_tiling), every tile is encoded by the frozen encoder, and the store keeps, per image,
the tiles' patch-token grids (class and register tokens dropped; average-pooled to a coarser grid when
asked) next to the usual class ‖ mean-patch embedding, with the tile layout in the image's attributes.
Ray actors decode, tile and encode; the driver writes each image as one committed entry, so a rerun
skips what is done and an unreadable or missing image is recorded and reported, never fatal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.dynamic_tiling import dynamic_tiles
from slidecache.cohorts.ids import image_key
from slidecache.cohorts.meta import read_meta
from slidecache.errors import AnnotationError, SlideBusy, StoreNotFound
from slidecache.jsonl import read_jsonl
from store import EmbeddingStore


@dataclass(frozen=True)
class DynamicTiling:
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6  # InternVL2-1B's finetune scripts
    use_thumbnail: bool = True
    tile_px: int = 224  # the encoder's input

    def describe(self) -> dict[str, Any]:
        return {"method": "internvl-dynamic", "min_dynamic_patch": self.min_dynamic_patch,
                "max_dynamic_patch": self.max_dynamic_patch, "use_thumbnail": self.use_thumbnail,
                "tile_px": self.tile_px}


@dataclass
class ImageEntry:
    key: str
    path: str
    source: str  # the first annotation line that names it (file:line), for error messages
    dataset: str
    image: str


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


@dataclass
class ImageResult:
    key: str
    error: str | None = None
    error_class: str | None = None
    layout: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)
    embeddings: np.ndarray | None = None
    tokens: np.ndarray | None = None
    seconds: float = 0.0


def encode_image(entry: ImageEntry, encoder: Any, tiling: DynamicTiling) -> ImageResult:
    """Decode, tile and encode one image; a failure is returned (with a message naming the file), not raised."""
    from PIL import Image, UnidentifiedImageError

    started = time.perf_counter()
    try:
        with Image.open(entry.path) as image:
            image.load()
            size = image.size
            tiles, layout = dynamic_tiles(image, tiling.min_dynamic_patch, tiling.max_dynamic_patch, tiling.tile_px,
                                          tiling.use_thumbnail)
    except FileNotFoundError:
        return ImageResult(entry.key, f"{entry.path}: file not found (named at {entry.source}); fix 'root' in the "
                                      "meta JSON or the image path", "FileNotFoundError")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return ImageResult(entry.key, f"{entry.path}: not a readable image ({e}); named at {entry.source}",
                           type(e).__name__)
    embeddings, tokens = encoder(tiles)
    return ImageResult(entry.key, layout={"cols": layout.cols, "rows": layout.rows, "thumbnail": layout.thumbnail},
                       size=size, embeddings=embeddings, tokens=tokens, seconds=time.perf_counter() - started)


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


def _actor_class(cfg: ExtractConfig, tiling: DynamicTiling, gpus: float) -> Any:
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=0 if gpus else 1, max_restarts=-1, max_task_retries=-1)
    class ImageEncoderActor:
        def __init__(self) -> None:
            from extract.inference import BatchEncoder

            self.encoder = BatchEncoder(cfg)

        def describe(self) -> dict[str, Any]:
            return {"encoder": self.encoder.describe(), "token_shape": self.encoder.token_shape}

        def encode(self, entries: Sequence[ImageEntry]) -> list[ImageResult]:
            return [encode_image(e, self.encoder, tiling) for e in entries]

    return ImageEncoderActor


class ImageExtraction:
    """Encode the images of `entries` into the `images` store at `store_url` (see module docstring)."""

    def __init__(self, entries: Sequence[ImageEntry], store_url: str, cfg: ExtractConfig,
                 tiling: DynamicTiling = DynamicTiling(), batch_images: int = 8,
                 log: Callable[[str], None] = print) -> None:
        self.entries, self.store_url, self.cfg, self.tiling = list(entries), store_url, cfg, tiling
        self.batch_images, self.log = batch_images, log

    def run(self) -> ImageSummary:
        import ray

        started = time.perf_counter()
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        device = "cuda" if gpus else "cpu"
        self.cfg = self.cfg.for_device(device)
        complete = self._all_complete(device)
        if complete is not None:
            return complete
        n_actors = self.cfg.num_encoders or max(1, int(ray.cluster_resources().get("GPU", 0))) or 1
        actor_cls = _actor_class(self.cfg, self.tiling, gpus)
        actors = [actor_cls.remote() for _ in range(n_actors)]
        info = ray.get(actors[0].describe.remote())
        spec = self._spec(info["encoder"], info["token_shape"])
        store = EmbeddingStore.create_or_open(self.store_url, kind="images", spec=spec, config=self.cfg.to_dict())
        summary = ImageSummary()
        todo = []
        for entry in self.entries:
            if store.is_complete(entry.key):
                summary.skipped.append(entry.key)
            else:
                todo.append(entry)
        if summary.skipped:
            self.log(f"[images] {len(summary.skipped)} images already in the store: skipped")
        batches = [todo[i:i + self.batch_images] for i in range(0, len(todo), self.batch_images)]
        by_key = {e.key: e for e in todo}
        pending: dict[Any, int] = {}
        next_batch = 0
        while next_batch < len(batches) or pending:
            while next_batch < len(batches) and len(pending) < 2 * len(actors):
                actor = actors[next_batch % len(actors)]
                pending[actor.encode.remote(batches[next_batch])] = next_batch
                next_batch += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            for result in ray.get(ready[0]):
                self._write(store, by_key[result.key], result, info["token_shape"], summary)
            done = len(summary.done) + len(summary.failed)
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed else 0.0
            eta = (len(todo) - done) / rate if rate else float("nan")
            self.log(f"[images] {done}/{len(todo)} images ({len(summary.failed)} failed), {summary.tiles} tiles, "
                     f"{summary.tiles / elapsed:.1f} tiles/s, ETA {eta:.0f} s")
        summary.seconds = time.perf_counter() - started
        return summary

    def _spec(self, encoder: dict[str, Any], token_shape: Any) -> dict[str, Any]:
        return {"encoder": encoder, "tiling": self.tiling.describe(),
                "tokens": {"grid_shape": list(token_shape), "prefix_tokens_dropped": True}}

    def _all_complete(self, device: str) -> ImageSummary | None:
        """When the store already holds every image: the summary, with no encoder started (the fingerprint
        checked from the config, as extract/job.py does); else None."""
        from extract.inference import expected_encoder

        try:
            store = EmbeddingStore.open(self.store_url)
        except StoreNotFound:
            return None
        if store.kind != "images" or not all(store.is_complete(entry.key) for entry in self.entries):
            return None  # create_or_open refuses another kind; what is missing is encoded
        store.check_fingerprint(self._spec(*expected_encoder(self.cfg, device)))
        summary = ImageSummary(skipped=[entry.key for entry in self.entries])
        self.log(f"[images] {len(summary.skipped)} images already in the store: skipped (no encoder started)")
        return summary

    def _write(self, store: EmbeddingStore, entry: ImageEntry, result: ImageResult, token_shape: Any,
               summary: ImageSummary) -> None:
        if result.error is not None:
            error_type = type(result.error_class or "ImageError", (Exception,), {})  # the actor's class name
            store.record_failure(entry.key, error_type(result.error))
            summary.failed.append((entry.key, result.error))
            self.log(f"[images] failed: {result.error}")
            return
        assert result.embeddings is not None and result.tokens is not None
        n, px = len(result.embeddings), self.tiling.tile_px
        cols, rows = result.layout["cols"], result.layout["rows"]
        grid = [(c * px, r * px) for r in range(rows) for c in range(cols)]
        if result.layout["thumbnail"]:
            grid.append((0, rows * px))  # the thumbnail: the row after the grid
        attrs = {"source": {"path": entry.path, "dataset": entry.dataset, "image": entry.image},
                 "image_size": list(result.size), "layout": result.layout, "patient_id": None,
                 "timings": {"encode_s": round(result.seconds, 3)}}
        if store.is_complete(entry.key):  # another job finished it meanwhile
            summary.skipped.append(entry.key)
            return
        try:
            with store.write_slide(entry.key, attrs, token_shape=tuple(token_shape)) as writer:
                writer.append(np.asarray(grid, dtype=np.int32), np.ones(n, dtype=np.float16), result.embeddings,
                              tokens=result.tokens)
                writer.commit()
        except SlideBusy as e:  # another live job writes this image and will commit it
            summary.skipped.append(entry.key)
            self.log(f"[images] skipped: {e}")
            return
        summary.done.append(entry.key)
        summary.tiles += n

