"""A new image encoded on the fly exactly as `python -m extract images` cached its dataset: the store's
encoder (name and weights, checked by hash), its dynamic tiling and token grid, then pixel shuffle. Used by
`python -m train.generate --image`; the only training-side code that builds the encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slidecache.errors import ConfigError
from store.embedding_store import EmbeddingStore
from train.visual import grid_to_visual_tokens


def _weights_for(encoder_spec: dict, weights: str | None) -> str | None:
    """The weights the store was made with: random init (nothing to give), a hub id, or a local file that
    the user names with --weights (the store keeps only its name and hash)."""
    recorded = str(encoder_spec.get("weights_id", ""))
    if weights:
        return weights
    if recorded.startswith("random-init"):
        return None
    if encoder_spec.get("weights_sha256") and "/" not in recorded:
        raise ConfigError(f"the store was encoded with local weights {recorded!r}: pass --weights PATH to that file")
    return recorded or None


def encode_image(image_path: str | Path, store: EmbeddingStore, weights: str | None = None,
                 device: torch.device | None = None) -> np.ndarray:
    """(tiles x tokens per tile, 4C) float32 visual tokens of one image, as the cache would hold them."""
    from PIL import Image

    from extract.config import ExtractConfig
    from extract.dynamic_tiling import dynamic_tiles
    from extract.inference import BatchEncoder

    if store.kind != "images":
        raise ConfigError(f"--image needs the images store the model was trained on; {store.url} holds {store.kind}")
    spec = store.spec
    encoder_spec, tiling, grid_shape = spec["encoder"], spec["tiling"], spec["tokens"]["grid_shape"]
    side = int(round(grid_shape[0] ** 0.5))
    cfg = ExtractConfig(encoder=encoder_spec["name"], weights=_weights_for(encoder_spec, weights),
                        tokens=f"{side}x{side}", batch_size=16)
    encoder = BatchEncoder(cfg, device)
    if encoder_spec.get("weights_sha256") and encoder.describe().get("weights_sha256") != encoder_spec["weights_sha256"]:
        raise ConfigError("--weights: these weights' sha256 differs from the ones the store was encoded with")
    try:
        with Image.open(image_path) as image:
            tiles, _ = dynamic_tiles(image, tiling["min_dynamic_patch"], tiling["max_dynamic_patch"],
                                     tiling["tile_px"], tiling["use_thumbnail"])
    except FileNotFoundError as e:
        raise ConfigError(f"--image {image_path}: no such file") from e
    except OSError as e:
        raise ConfigError(f"--image {image_path}: not a readable image ({e})") from e
    _, grids = encoder(tiles)  # float16, as stored
    return grid_to_visual_tokens(torch.from_numpy(grids.astype(np.float32))).numpy()
