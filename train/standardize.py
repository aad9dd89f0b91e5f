"""Per-dimension standardisation of cached tile vectors before the projector.

Why: cached tile vectors are not centred. A component shared by every tile dominates them (virchow2-tiny:
63 of 128 dimensions constant over every tile; real pathology encoders carry a few very large channels),
and the projector's per-token LayerNorm cannot remove a component every token shares. Fed raw vectors, a
reporter learned to ignore the image while its loss fell (issue 26). So every tile is z-scored per
dimension with statistics of the training split only, and the statistics travel with the checkpoint:
training, generation, `--slide`, `--image` and merged exports apply the very same numbers.

The statistics are streamed (Chan et al.'s pairwise merge of count, mean and M2 in float64), from at
most `rows_per_item` seeded random rows of at most `max_items` training slides (or cached images), so a
TCGA-sized store is read about as much as one training epoch reads it, and never held in memory.
A dimension constant over the training tiles carries nothing the model could learn: it maps to 0 (a
tiny wobble there at inference would otherwise be divided by ~0). Stores hold float16, whose steps are
~1/1000 of a value: a dimension whose spread is under one step is rounding noise, and counts as constant
(z-scored, it would become unit-variance noise as loud as the signal). Standardised values are clipped to
±`clip`, so one out-of-distribution tile cannot dominate the projector's LayerNorm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slidecache.errors import TrainingError

STANDARDIZER_FILE = "tile_standardizer.safetensors"
DEFAULT_CLIP = 10.0
# A dimension whose spread is below this share of its magnitude is constant up to float16 rounding (one
# float16 step is 2^-11 to 2^-10 of the value); below CONSTANT_STD it is constant whatever its magnitude.
CONSTANT_RELATIVE_STD = 2.0**-10
CONSTANT_STD = 1e-6


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations per dimension, merged batch by batch (float64)."""

    count: int = 0
    mean: np.ndarray | None = None  # (D,)
    m2: np.ndarray | None = None  # (D,)

    def update(self, rows: np.ndarray) -> None:
        """Merge a batch of rows (n, D): Chan et al.'s parallel update, stable when |mean| >> std."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or not len(rows):
            return
        if not np.isfinite(rows).all():
            raise TrainingError("a tile vector holds NaN or infinity; the store is damaged (python -m store verify)")
        n, batch_mean = len(rows), rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        assert self.m2 is not None
        return np.sqrt(self.m2 / max(self.count, 1))


@dataclass
class TileStatistics:
    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, population std
    tiles: int  # rows counted
    items: int  # slides (or images) they came from
    seconds: float = 0.0

    @property
    def constant_dims(self) -> int:
        return int(self.constant.sum())

    @property
    def constant(self) -> np.ndarray:
        """(D,) bool: dimensions constant up to float16 rounding over the tiles counted."""
        return self.std <= np.maximum(CONSTANT_RELATIVE_STD * np.abs(self.mean), CONSTANT_STD)

    def summary(self) -> dict[str, float | int]:
        return {"tiles": self.tiles, "items": self.items, "dims": int(len(self.mean)),
                "constant_dims": self.constant_dims, "mean_abs_mean": float(np.abs(self.mean).mean()),
                "median_std_of_varying": float(np.median(self.std[~self.constant])) if (~self.constant).any() else 0.0,
                "seconds": round(self.seconds, 2)}


def stream_statistics(keys: Iterable[str], read_rows: Callable[[str, np.random.Generator], np.ndarray],
                      max_items: int = 10_000, seed: int = 0) -> TileStatistics:
    """Statistics over the rows `read_rows(key, rng)` returns for each key (at most `max_items` keys, a seeded
    random subset when there are more). Keys are de-duplicated: a slide named by two samples counts once."""
    started = time.perf_counter()
    unique = sorted(set(keys))
    if not unique:
        raise TrainingError("no training slide to compute the tile statistics from")
    rng = np.random.default_rng(seed)
    if len(unique) > max_items:
        unique = sorted(rng.choice(unique, size=max_items, replace=False).tolist())
    moments = RunningMoments()
    for key in unique:
        moments.update(read_rows(key, rng))
    if moments.mean is None:
        raise TrainingError(f"the {len(unique)} training slides hold no tiles to compute the tile statistics from")
    return TileStatistics(moments.mean, moments.std, moments.count, len(unique), time.perf_counter() - started)


class TileStandardizer(nn.Module):
    """(…, D) tiles → clip((tiles − mean) · scale, ±clip); scale = 1/std, 0 on constant dimensions.

    The numbers are buffers: they move with the model (device, dtype) and are never trained."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, clip: float = DEFAULT_CLIP) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())
        self.clip = float(clip)

    @classmethod
    def from_statistics(cls, stats: TileStatistics, clip: float = DEFAULT_CLIP) -> "TileStandardizer":
        constant = stats.constant
        scale = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, stats.std))
        return cls(torch.from_numpy(stats.mean), torch.from_numpy(scale), clip)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        z = (tiles.float() - self.mean) * self.scale
        return z.clamp(-self.clip, self.clip)

    def blank(self, n: int) -> torch.Tensor:
        """n tiles that standardise to zeros: the training mean (the grounding check's 'no image')."""
        return self.mean.unsqueeze(0).expand(n, -1).clone()

    def save(self, path: str | Path) -> None:
        save_file({"mean": self.mean.detach().cpu().contiguous(), "scale": self.scale.detach().cpu().contiguous()},
                  str(path), metadata={"clip": str(self.clip)})

    @classmethod
    def load(cls, path: str | Path) -> "TileStandardizer":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise TrainingError(f"{path} is missing: the checkpoint was trained on standardised tiles and cannot be "
                                "used without their statistics (copy the whole run folder)")
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            clip = float((f.metadata() or {}).get("clip", DEFAULT_CLIP))
        if set(tensors) != {"mean", "scale"} or tensors["mean"].shape != tensors["scale"].shape:
            raise TrainingError(f"{path}: expected 'mean' and 'scale' vectors of one length")
        return cls(tensors["mean"], tensors["scale"], clip)
