"""Extraction settings: one dataclass, loadable from YAML, overridable from the command line.

What changes the numbers (encoder, tiling, tissue) goes into the store fingerprint via `fingerprint_spec`;
the rest (batch size, workers, readers) is recorded as provenance only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from store.configs import find_config
from store.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
_GRID = re.compile(r"^(\d+)x\1$")


@dataclass
class ExtractConfig:
    # what changes the numbers
    encoder: str = "virchow2"
    weights: str | None = None  # hub id or local .safetensors; None: the registry's default
    target_mpp: float = 0.5
    tile_px: int = 224
    stride_px: int | None = None  # None: = tile_px (non-overlapping)
    min_tissue: float = 0.25
    tokens: str | None = None  # e.g. "4x4": also store pooled patch-token grids
    # how the work is done
    batch_size: int = 128
    read_chunk: int = 256  # tiles per reader task
    readers: tuple[str, ...] = ("cucim", "openslide", "tiffslide")
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16
    mpp_override: float | None = None
    thumbnail_max_side: int = 2048
    retry_failed: bool = False
    limit: int | None = None
    num_encoders: int | None = None  # None: one per GPU, or one CPU encoder without GPUs
    reader_cpus: float = 1.0
    object_store_memory: int = 2 * 1024**3  # local Ray only (the default would take ~30% of RAM)
    qc_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tile_px <= 0 or self.target_mpp <= 0:
            raise ConfigError(f"tile_px and target_mpp must be positive (got {self.tile_px}, {self.target_mpp})")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min_tissue must be within [0, 1], got {self.min_tissue}")
        if self.tokens is not None and not _GRID.match(str(self.tokens)):
            raise ConfigError(f"tokens must look like 4x4 (a square grid), got {self.tokens!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size <= 0 or self.read_chunk <= 0:
            raise ConfigError("batch_size and read_chunk must be positive")
        self.readers = tuple(self.readers)

    @property
    def token_grid(self) -> int | None:
        return int(str(self.tokens).split("x")[0]) if self.tokens else None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExtractConfig:
        path = find_config(path, "extract")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read extraction config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of settings")
        return cls.from_dict({**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> ExtractConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["readers"] = list(self.readers)
        return out

    def tiling_spec(self, tissue_description: Mapping[str, Any]) -> dict[str, Any]:
        return {"target_mpp": self.target_mpp, "tile_px": self.tile_px, "stride_px": self.stride_px or self.tile_px,
                "resample": "box average for integer factors, else bicubic", "tissue": dict(tissue_description),
                "tokens": self.tokens}
