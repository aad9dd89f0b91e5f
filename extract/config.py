"""Extraction settings, loadable from YAML, overridable from the command line: one flat file, split on loading
into what changes the numbers (`ExtractSpec`: the encoder, the tiling, the tissue rule; the store's fingerprint
hashes it) and how the work is done (`RunOptions`: batch size, workers, executor, readers; recorded in the
store's provenance only). `ExtractConfig` holds both.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Self

import yaml

from slidecache.configs import find_config, shipped
from slidecache.errors import ConfigError

_GRID = re.compile(r"^(\d+)x\1$")
DEFAULT_CONFIG = shipped("extract", "virchow2.yaml")
EXECUTORS = ("auto", "ray", "local")  # extract/executors.py
# Encoder batch and tiles per reader task where a config leaves them out. GPU: throughput stops growing from
# batch 128 up (bench/RESULTS.md). CPU: an encoder is slow, so small read chunks keep every reader busy on small
# slides and slide tails, and a small batch keeps activations in cache.
DEVICE_DEFAULTS: dict[str, dict[str, int]] = {"cuda": {"batch_size": 256, "read_chunk": 256},
                                              "cpu": {"batch_size": 32, "read_chunk": 64}}
# What may differ between the stores of one run (one read feeds them all): the encoder and how it runs. The
# run reads in the first store's read chunks (how many tiles a reader task reads changes no number).
PER_ENCODER_FIELDS = ("encoder", "weights", "tokens", "batch_size", "read_chunk", "precision", "compile",
                      "encoder_threads", "num_encoders", "extra")
# The order of the settings in a store's recorded config (and of check_one_read's search for a difference).
RECORDED_ORDER = ("encoder", "weights", "target_mpp", "tile_px", "stride_px", "min_tissue", "tokens", "batch_size",
                  "read_chunk", "encoder_threads", "readers", "precision", "compile", "mpp_override",
                  "thumbnail_max_side", "retry_failed", "limit", "num_encoders", "reader_cpus", "executor",
                  "object_store_memory", "qc_dir", "extra")


def _typed(name: str, value: Any, hint: Any, where: str) -> Any:
    """value as the field's type wants it (a whole number is a fine float; YAML's list is our tuple), or a
    ConfigError naming the setting, the file and what was given: a YAML typo must not become a TypeError."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue  # `true` is not a number of tiles
        if origin is int and isinstance(value, int):
            return value
        if origin is float and isinstance(value, (int, float)):
            return float(value)
        if origin is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if origin is dict and isinstance(value, dict):
            return value
    wanted = " or ".join(_TYPE_WORDS.get(typing.get_origin(o) or o, str(o)) for o in options)
    raise ConfigError(f"{where}: {name} must be {wanted}, got {value!r} ({type(value).__name__})")


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true/false",
               tuple: "a list of names", dict: "a mapping", type(None): "left out (null)"}


class _Settings:
    """Typed loading, shared by the spec, the run options and the two together."""

    @classmethod
    def _typed_settings(cls, data: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Each setting as its field's type wants it (in the order given); unknown names refused."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return {name: _typed(name, value, hints[name], where) for name, value in data.items()}

    @classmethod
    def _built(cls, typed: Mapping[str, Any], where: str) -> Self:
        try:
            return cls(**typed)
        except ConfigError as e:  # a value of the right type that cannot be used: name the file too
            raise ConfigError(f"{where}: {e}") from None


def _values(settings: Any, of: type) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(of)}


@dataclass
class ExtractSpec(_Settings):
    """What changes the numbers, and so what a store is fingerprinted with: the encoder (as it describes itself:
    extract.inference.expected_encoder) and the tiling (`tiling_spec`)."""

    encoder: str = "virchow2"
    weights: str | None = None  # hub id or local .safetensors; None: the registry's default
    target_mpp: float = 0.5
    tile_px: int = 224
    stride_px: int | None = None  # None: = tile_px (non-overlapping)
    min_tissue: float = 0.25
    tokens: str | None = None  # e.g. "4x4": also store pooled patch-token grids
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the encoder (fixed batch shapes; marked in the fingerprint)
    thumbnail_max_side: int = 2048  # of the tissue mask

    def __post_init__(self) -> None:
        self._check_spec()

    def _check_spec(self) -> None:
        for name in ("target_mpp", "min_tissue"):  # NaN passes every comparison
            _finite(name, getattr(self, name))
        if self.stride_px is not None and self.stride_px <= 0:
            raise ConfigError(f"stride_px must be positive (or left out: the tile size), got {self.stride_px}")
        if self.tile_px <= 0 or self.target_mpp <= 0:
            raise ConfigError(f"tile_px and target_mpp must be positive (got {self.tile_px}, {self.target_mpp})")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min_tissue must be within [0, 1], got {self.min_tissue}")
        if self.tokens is not None and not _GRID.match(str(self.tokens)):
            raise ConfigError(f"tokens must look like 4x4 (a square grid), got {self.tokens!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")

    @classmethod
    def from_recorded(cls, config: Mapping[str, Any], where: str = "recorded config") -> ExtractSpec:
        """The spec within a config a store recorded (its run options, and names no longer known, left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls._built(cls._typed_settings({k: v for k, v in config.items() if k in known}, where), where)

    @property
    def token_grid(self) -> int | None:
        return int(str(self.tokens).split("x")[0]) if self.tokens else None

    def tiling_spec(self, tissue_description: Mapping[str, Any]) -> dict[str, Any]:
        return {"target_mpp": self.target_mpp, "tile_px": self.tile_px, "stride_px": self.stride_px or self.tile_px,
                "resample": "box average for integer factors, else bicubic", "tissue": dict(tissue_description),
                "tokens": self.tokens}


SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(ExtractSpec))


@dataclass
class RunOptions(_Settings):
    """How the work is done: recorded in the store's provenance, never fingerprinted."""

    batch_size: int | None = None  # None: DEVICE_DEFAULTS for the device the encoders run on
    read_chunk: int | None = None  # tiles per reader task; None: DEVICE_DEFAULTS
    encoder_threads: int | None = None  # torch threads of a CPU encoder; None: every core of its node
    readers: tuple[str, ...] = ("cucim", "openslide", "tiffslide")
    # a slide's own pixel size where its file lacks it: a fact about the slide, so not fingerprinted
    mpp_override: float | None = None
    retry_failed: bool = False
    limit: int | None = None
    num_encoders: int | None = None  # None: one per GPU, or one CPU encoder without GPUs
    reader_cpus: float = 1.0
    executor: str = "auto"  # ray | local (one machine, no Ray) | auto (extract/executors.resolve_executor)
    object_store_memory: int = 2 * 1024**3  # local Ray only (the default would take ~30% of RAM)
    qc_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_run()

    def _check_run(self) -> None:
        for name in ("mpp_override", "reader_cpus"):
            _finite(name, getattr(self, name))
        for name in ("batch_size", "read_chunk", "encoder_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive whole number (or left out for the default), got {value!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be {', '.join(EXECUTORS[:-1])} or {EXECUTORS[-1]}, got {self.executor!r}")
        self.readers = tuple(self.readers)

    def for_device(self, device: str) -> Self:
        """These settings with the batch and read chunk left out taken from DEVICE_DEFAULTS ("cpu" or any GPU)."""
        defaults = DEVICE_DEFAULTS["cpu" if device == "cpu" else "cuda"]
        return dataclasses.replace(self, batch_size=self.batch_size or defaults["batch_size"],
                                   read_chunk=self.read_chunk or defaults["read_chunk"])


@dataclass
class ExtractConfig(RunOptions, ExtractSpec):
    """A spec and run options together, flat, as a YAML file and the command line give them and as every stage
    reads them (`cfg.tile_px`, `cfg.batch_size`); `spec` and `run` are the two parts."""

    def __post_init__(self) -> None:
        self._check_spec()
        self._check_run()

    @classmethod
    def of(cls, spec: ExtractSpec, run: RunOptions) -> ExtractConfig:
        return cls(**_values(spec, ExtractSpec), **_values(run, RunOptions))

    @property
    def spec(self) -> ExtractSpec:
        return ExtractSpec(**_values(self, ExtractSpec))

    @property
    def run(self) -> RunOptions:
        return RunOptions(**_values(self, RunOptions))

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
        """One flat mapping of settings, split into the spec and the run options."""
        typed = cls._typed_settings(data, where)
        spec = ExtractSpec._built({k: v for k, v in typed.items() if k in SPEC_FIELDS}, where)
        run = RunOptions._built({k: v for k, v in typed.items() if k not in SPEC_FIELDS}, where)
        return cls.of(spec, run)

    @classmethod
    def for_command(cls, config: str | Path | None, overrides: Mapping[str, Any]) -> ExtractConfig:
        """The command line's rule: `--config` when given, else configs/extract/<--encoder>.yaml when that
        exists, else the default (virchow2.yaml); `--encoder` and the other flags override what it says."""
        if config is None:
            named = shipped("extract", f"{overrides.get('encoder')}.yaml")
            config = named if overrides.get("encoder") and named.is_file() else DEFAULT_CONFIG
        return cls.from_yaml(config, overrides)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, in the order stores have always recorded them."""
        settings = dataclasses.asdict(self)
        out = {name: settings[name] for name in RECORDED_ORDER}
        out["readers"] = list(self.readers)
        return out


def _finite(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def check_one_read(configs: Mapping[str, ExtractConfig]) -> None:
    """Several stores filled from one read of each slide must agree on everything but the encoder (and how it
    runs): a different tiling, tissue rule or reader would need its own read. Raises ConfigError naming the
    first setting that differs, with each store's value."""
    for name in RECORDED_ORDER:
        if name in PER_ENCODER_FIELDS:
            continue
        values = {label: getattr(cfg, name) for label, cfg in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:
            shown = ", ".join(f"{label}: {value!r}" for label, value in values.items())
            raise ConfigError(f"the encoders of one run must share one read of each slide, and their configs differ in "
                              f"{name} ({shown}); give them the same {name} (one --config, or the same value in each "
                              f"configs/extract/ENCODER.yaml), or extract them in separate runs")
