"""Run the frozen encoder on uint8 tiles: preprocessing from the model's data config, micro-batches,
bf16 on CUDA (the weights cast, not autocast: faster, bench/RESULTS.md), fp32 on CPU."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from extract.config import ExtractConfig
from extract.tile_encoders import TileEncoder, build_encoder, pool_token_grid
from slidecache.devices import pick_device, usable_cores

STORE_DTYPE = "float16"
# Ray hands the encoder read-only views of its shared memory, which are only read: silence torch's warning
# once here, not per batch (catch_warnings per call also races with the actor's writer threads).
_READ_ONLY_WARNING = "The given NumPy array is not writable"
warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING)
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def cpu_threads(asked: int | None) -> int:
    """Torch threads for a CPU encoder: as asked, else every core this process may run on. Ray gives an actor
    OMP_NUM_THREADS=1; the readers are Ray tasks on the same cores and the OS shares them out (one thread left
    about half of a 2-core node idle while encoding: bench/RESULTS.md)."""
    return asked or usable_cores()


def _fingerprint_part(encoder: TileEncoder, precision: str, compiled: bool) -> dict[str, Any]:
    marked = {"compiled": True} if compiled else {}  # only when on: older stores keep their fingerprint
    return {**encoder.describe(), "dtype": STORE_DTYPE, "compute_precision": precision, **marked}


def _token_shape(token_grid: int | None, encoder: TileEncoder) -> tuple[int, int] | None:
    return (token_grid**2, encoder.width) if token_grid else None


def expected_encoder(cfg: ExtractConfig, device_type: str) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """BatchEncoder(cfg).describe() and .token_shape on a device of this type, without building the model or
    reading its weights (build_encoder(meta=True); a weights file is hashed)."""
    encoder = build_encoder(cfg.encoder, cfg.weights, meta=True)
    spec = _fingerprint_part(encoder, resolve_precision(cfg.precision, torch.device(device_type)), cfg.compile)
    return spec, _token_shape(cfg.token_grid, encoder)


class BatchEncoder:
    """uint8 tiles (n, H, W, 3) → float16 embeddings (n, 2C) and optional token grids (n, g*g, C)."""

    def __init__(self, cfg: ExtractConfig, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.precision = resolve_precision(cfg.precision, self.device)
        dtype = _PRECISIONS[self.precision]
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg.encoder_threads))
        self.encoder = build_encoder(cfg.encoder, cfg.weights, device=self.device, dtype=dtype)
        self.dtype = dtype
        self.batch_size = cfg.for_device(self.device.type).batch_size
        self.token_grid = cfg.token_grid
        data = self.encoder.data_config
        self.input_size = tuple(int(v) for v in data["input_size"][1:])
        self.interpolation = str(data["interpolation"])
        mean, std = torch.tensor(data["mean"]), torch.tensor(data["std"])
        # (x / 255 - mean) / std as one multiply-add on x
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        if self.token_grid and self.encoder.grid % self.token_grid:
            raise ValueError(f"--tokens {cfg.tokens}: the encoder's {self.encoder.grid}x{self.encoder.grid} patch grid "
                             f"does not pool evenly to {self.token_grid}x{self.token_grid}")
        self.compiled = cfg.compile
        if self.compiled:
            self._compile()

    def _compile(self) -> None:
        """torch.compile for one batch shape: every batch is padded to batch_size, so nothing recompiles, and
        the compilation happens here, before the encoder reports ready, not inside the first slide."""
        self.encoder.model = torch.compile(self.encoder.model, dynamic=False)
        h, w = self.input_size
        self._encode(np.zeros((self.batch_size, h, w, 3), dtype=np.uint8))

    def describe(self) -> dict[str, Any]:
        """The encoder part of the store fingerprint."""
        return _fingerprint_part(self.encoder, self.precision, self.compiled)

    @property
    def token_shape(self) -> tuple[int, int] | None:
        return _token_shape(self.token_grid, self.encoder)

    def _preprocess(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) → normalised (B, 3, H, W) in the compute dtype: channels made planar on the
        uint8 bytes, then one float conversion and one in-place multiply-add (3.3x the speed of float-then-
        permute on CPU, which left a channels-last tensor the model ran slower on: bench/RESULTS.md)."""
        x = torch.from_numpy(np.ascontiguousarray(tiles))  # read-only views are fine: see _READ_ONLY_WARNING
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
        x = x.mul_(self.scale).add_(self.shift)
        if tuple(x.shape[-2:]) != self.input_size:  # linear, so it commutes with the normalisation
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, antialias=True, align_corners=False)
        return x.to(self.dtype)

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be uint8 (n, H, W, 3), got {tiles.dtype} {tiles.shape}")
        return self._encode(tiles)

    @torch.inference_mode()
    def _encode(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        embeddings, grids = [], []
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start:start + self.batch_size]
            n = len(batch)
            if self.compiled and n < self.batch_size:  # the compiled shape: pad, keep the first n rows
                batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), np.uint8)])
            tokens = self.encoder.tokens(self._preprocess(batch))[:n]  # (n, 1+R+P, C)
            embeddings.append(self.encoder.pool(tokens).float().cpu())
            if self.token_grid:
                grids.append(pool_token_grid(tokens.float(), self.encoder.num_prefix_tokens, self.token_grid).cpu())
        emb = torch.cat(embeddings).numpy().astype(np.float16) if embeddings else np.zeros((0, self.encoder.embedding_dim), np.float16)
        grid = torch.cat(grids).numpy().astype(np.float16) if grids else None
        return emb, grid
