"""Small builders shared by the store tests."""

from __future__ import annotations

import numpy as np

DIM = 32


def spec(dim: int = DIM, tile_px: int = 224) -> dict:
    return {
        "encoder": {"name": "test-encoder", "weights_id": "random-init:seed=0", "weights_sha256": None,
                    "pooling": "cls+mean_patch(no_registers)", "preprocessing": {"mean": [0.5] * 3}, "dim": dim,
                    "dtype": "float16"},
        "tiling": {"target_mpp": 0.5, "tile_px": tile_px, "stride_px": tile_px, "tissue": {"method": "otsu", "min": 0.25}},
    }


def slide_rows(n: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """coords (n, 2) on a 224 px grid, tissue fractions, and structured float16 embeddings (n, dim)."""
    rng = np.random.default_rng(seed)
    side = max(1, int(np.ceil(np.sqrt(n))))
    coords = np.stack([(np.arange(n) % side) * 224, (np.arange(n) // side) * 224], axis=1).astype(np.int64)
    tissue = rng.uniform(0.25, 1.0, n).astype(np.float32)
    centre = rng.normal(0, 1, dim)
    emb = (centre + 0.3 * rng.normal(0, 1, (n, dim))).astype(np.float16)
    return coords, tissue, emb


def write_slide(store, slide_id: str, n: int, seed: int = 0, patient_id: str | None = None, block_rows: int | None = None,
                tokens: bool = False):
    coords, tissue, emb = slide_rows(n, store.embedding_dim, seed)
    tok = np.random.default_rng(seed).normal(size=(n, 4, 8)).astype(np.float16) if tokens else None
    with store.write_slide(slide_id, {"patient_id": patient_id or slide_id, "mpp": 0.25, "mpp_source": "test"},
                           token_shape=(4, 8) if tokens else None, block_rows=block_rows) as w:
        w.append(coords, tissue, emb, tok)
        view = w.commit()
    return view, coords, tissue, emb, tok
