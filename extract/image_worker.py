"""One encoder that cuts, encodes and writes whole images of InternVL-format datasets: what `extract images`
runs in each encoder of an executor (a Ray actor, or a thread of the driver), as EncoderWorker does for
slides. It writes each image itself, as one committed entry, so no tile crosses back to the driver; an image
that cannot be read is recorded in the store's failures with its own error, never fatal."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from extract.config import ExtractConfig
from extract.dynamic_tiling import dynamic_tiles
from slidecache.errors import ImageReadError, SlideBusy


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


@dataclass(frozen=True)
class ImageOutcome:
    """What the driver learns of one image: small, whatever the image's size."""
    key: str
    status: str  # done, skipped (another job has it, or finished it), failed
    tiles: int = 0
    message: str = ""


def tile_image(entry: ImageEntry, tiling: DynamicTiling) -> tuple[np.ndarray, Any, tuple[int, int]]:
    """The image's tiles (InternVL's dynamic tiling), their layout and the image's size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(entry.path) as image:
            image.load()
            tiles, layout = dynamic_tiles(image, tiling.min_dynamic_patch, tiling.max_dynamic_patch, tiling.tile_px,
                                          tiling.use_thumbnail)
            return tiles, layout, image.size
    except FileNotFoundError:
        raise ImageReadError(f"{entry.path}: file not found (named at {entry.source}); fix 'root' in the meta JSON "
                             "or the image path") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageReadError(f"{entry.path}: not a readable image ({e}); named at {entry.source}") from e


def tile_places(layout: Any, tile_px: int) -> np.ndarray:
    """Each tile's (x, y) in the tiled image: the grid row by row, then the thumbnail in the row after it."""
    grid = [(c * tile_px, r * tile_px) for r in range(layout.rows) for c in range(layout.cols)]
    if layout.thumbnail:
        grid.append((0, layout.rows * tile_px))
    return np.asarray(grid, dtype=np.int32)


class ImageEncoderWorker:
    """Built by an executor as it builds EncoderWorker (config, store URL, storage options, node, device); the
    store is opened at the first batch, after the driver has created it from this encoder's description."""

    def __init__(self, config: ExtractConfig, store_url: str, storage_options: dict[str, Any], node: str,
                 device: str | None = None) -> None:
        import torch

        from extract.inference import BatchEncoder

        self.encoder = BatchEncoder(config, torch.device(device) if device else None)
        self.store_url, self.storage_options, self.node = store_url, storage_options, node
        self._store: Any = None

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.encoder.describe(), "token_shape": self.encoder.token_shape, "node": self.node}

    def encode_images(self, entries: Sequence[ImageEntry], tiling: DynamicTiling) -> list[ImageOutcome]:
        if self._store is None:
            from store.embedding_store import EmbeddingStore

            self._store = EmbeddingStore.open(self.store_url, mode="a", storage_options=self.storage_options)
        return [self._encode_and_write(entry, tiling) for entry in entries]

    def _encode_and_write(self, entry: ImageEntry, tiling: DynamicTiling) -> ImageOutcome:
        store = self._store
        if store.is_complete(entry.key):  # another job finished it meanwhile
            return ImageOutcome(entry.key, "skipped")
        started = time.perf_counter()
        try:
            tiles, layout, size = tile_image(entry, tiling)
        except ImageReadError as e:
            store.record_failure(entry.key, e)
            return ImageOutcome(entry.key, "failed", message=str(e))
        embeddings, tokens = self.encoder(tiles)
        layout_attrs = {"cols": layout.cols, "rows": layout.rows, "thumbnail": layout.thumbnail}
        attrs = {"source": {"path": entry.path, "dataset": entry.dataset, "image": entry.image},
                 "image_size": list(size), "layout": layout_attrs, "patient_id": None,
                 "timings": {"encode_s": round(time.perf_counter() - started, 3)}}
        try:
            with store.write_slide(entry.key, attrs, token_shape=tuple(self.encoder.token_shape)) as writer:
                writer.append(tile_places(layout, tiling.tile_px), np.ones(len(embeddings), dtype=np.float16),
                              embeddings, tokens=tokens)
                writer.commit()
        except SlideBusy as e:  # another live job writes this image and will commit it
            return ImageOutcome(entry.key, "skipped", message=str(e))
        return ImageOutcome(entry.key, "done", tiles=len(embeddings))
