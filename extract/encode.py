"""Run the frozen encoder on uint8 tiles: preprocessing from the model's data config, micro-batches,
bf16 on CUDA (weights cast: 12% faster than autocast on an H200, bench/RESULTS.md), fp32 on CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from extract.config import ExtractConfig
from extract.encoders import build_encoder, pool_tile_embedding, pool_token_grid
from extract.faults import maybe_kill_encoder
from store.devices import pick_device

STORE_DTYPE = "float16"
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


class BatchEncoder:
    """uint8 tiles (n, H, W, 3) → float16 embeddings (n, 2C) and optional token grids (n, g*g, C)."""

    def __init__(self, cfg: ExtractConfig, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.precision = resolve_precision(cfg.precision, self.device)
        dtype = _PRECISIONS[self.precision]
        self.encoder = build_encoder(cfg.encoder, cfg.weights, device=self.device, dtype=dtype)
        self.dtype = dtype
        self.batch_size = cfg.batch_size
        self.token_grid = cfg.token_grid
        data = self.encoder.data_config
        self.input_size = tuple(int(v) for v in data["input_size"][1:])
        self.interpolation = str(data["interpolation"])
        self.mean = torch.tensor(data["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(data["std"], device=self.device).view(1, 3, 1, 1)
        if self.token_grid and self.encoder.grid % self.token_grid:
            raise ValueError(f"--tokens {cfg.tokens}: the encoder's {self.encoder.grid}x{self.encoder.grid} patch grid "
                             f"does not pool evenly to {self.token_grid}x{self.token_grid}")

    def describe(self) -> dict[str, Any]:
        """The encoder part of the store fingerprint."""
        return {**self.encoder.describe(), "dtype": STORE_DTYPE, "compute_precision": self.precision}

    @property
    def token_shape(self) -> tuple[int, int] | None:
        return (self.token_grid**2, self.encoder.width) if self.token_grid else None

    def _preprocess(self, tiles: np.ndarray) -> torch.Tensor:
        if not tiles.flags.writeable:  # Ray hands over read-only views of its shared memory
            tiles = tiles.copy()
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, antialias=True, align_corners=False)
        return ((x - self.mean) / self.std).to(self.dtype)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be uint8 (n, H, W, 3), got {tiles.dtype} {tiles.shape}")
        maybe_kill_encoder(tiles)
        embeddings, grids = [], []
        for start in range(0, len(tiles), self.batch_size):
            tokens = self.encoder.tokens(self._preprocess(tiles[start:start + self.batch_size]))  # (B, 1+R+P, C)
            embeddings.append(pool_tile_embedding(tokens, self.encoder.num_prefix_tokens).float().cpu())
            if self.token_grid:
                grids.append(pool_token_grid(tokens.float(), self.encoder.num_prefix_tokens, self.token_grid).cpu())
        emb = torch.cat(embeddings).numpy().astype(np.float16) if embeddings else np.zeros((0, self.encoder.embedding_dim), np.float16)
        grid = torch.cat(grids).numpy().astype(np.float16) if grids else None
        return emb, grid
