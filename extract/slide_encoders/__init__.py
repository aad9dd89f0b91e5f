"""Slide encoders: one embedding per slide from the tile features a store already holds, in the registry style of
extract.tile_encoders (a builder, the card's facts, a `-random` twin of the same architecture, weights from a hub
id with HF_TOKEN or a local file, read safely, never a repository's own code).

    PRISM                 Perceiver over Virchow (v1) tile embeddings (2560-d)            → 1280-d   (prism.py)
    TITAN                 ViT with ALiBi over CONCH v1.5 features on the 2-D tile grid   → 768-d    (titan.py)
    Prov-GigaPath slide   LongNet over GigaPath tile features and their grid cells       → 768-d    (gigapath.py)

Each architecture is our own code, learnt from the public model code named in its module; its parameter names
and shapes are the published ones, so a published file loads strictly (weights.py). One slide in, one vector
out: SlideEncoder.embed(features (N, D), level-0 corners (N, 2), level-0 tile spacing)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.encoder_weights import gated_and_random, read_state_dict, resolve_weights_file, sha256_file
from extract.slide_encoders.gigapath import GIGAPATH_SLIDE_ARCH, GigaPathSlideEncoder
from extract.slide_encoders.prism import PRISM_ARCH, PrismResampler
from extract.slide_encoders.tiles import as_tiles
from extract.slide_encoders.titan import TITAN_ARCH, TitanSlideEncoder
from extract.slide_encoders.weights import load_slide_state
from slidecache.errors import EncoderError

_FAMILIES: dict[str, type[torch.nn.Module]] = {
    "prism": PrismResampler, "titan": TitanSlideEncoder, "gigapath": GigaPathSlideEncoder,
}
# the arch fields that are the tile-feature width and the slide-embedding width, by family
_WIDTHS = {"prism": ("context_dim", "latent_dim"), "titan": ("tile_dim", "embed_dim"),
           "gigapath": ("tile_dim", "embed_dim")}
_BUILD_LOCK = threading.Lock()  # random init draws from torch's global generator: one build at a time


@dataclass(frozen=True)
class SlideEncoderSpec:
    """A registry entry: the architecture, where its weights are published, and what it reads."""

    name: str
    family: str  # a key of _FAMILIES
    arch: dict[str, Any]
    tile_encoder: str  # the tile encoder (extract.tile_encoders) whose features it reads
    tile_px: int  # the card's tile side at target_mpp: the store's tiling should match
    target_mpp: float = 0.5
    weights: str | None = None  # a hub id, a local path, or None (random init)
    weights_files: tuple[str, ...] = ("model.safetensors",)
    state_prefix: str = ""  # where the slide encoder's keys sit in the published file
    ignored_prefixes: tuple[str, ...] = ()  # the rest of the published model, not built here
    nested_key: str | None = None  # a torch checkpoint dict holding the state dict under this key
    positions: str = ""  # how tile positions enter ("" where they do not)
    output: str = ""  # which vector is the slide embedding
    description: str = ""
    seed: int = 0

    @property
    def tile_dim(self) -> int:
        return int(self.arch[_WIDTHS[self.family][0]])

    @property
    def embedding_dim(self) -> int:
        return int(self.arch[_WIDTHS[self.family][1]])

    def variant(self, name: str, weights: str | None = None, seed: int | None = None, **arch: Any) -> SlideEncoderSpec:
        """The same family with some architecture fields changed (e.g. depth=1), random-init unless weights."""
        return replace(self, name=name, arch={**self.arch, **arch}, weights=weights,
                       seed=self.seed if seed is None else seed)


_entries = partial(gated_and_random, SlideEncoderSpec)  # a gated hub model and its random-init twin

REGISTRY: dict[str, SlideEncoderSpec] = {
    **_entries("prism", "paige-ai/Prism",
               "PRISM (Paige): Perceiver over Virchow tile embeddings, 1280-d; its BioGPT report decoder "
               "(prism_decoder.py) reports as a baseline: `python -m evaluate prism-report`",
               family="prism", arch=PRISM_ARCH, tile_encoder="virchow", tile_px=224,
               state_prefix="image_resampler.",
               # the report decoder (prism_decoder.py loads it with the resampler) and the contrastive head
               ignored_prefixes=("text_decoder.", "img_to_latents.", "text_to_latents.", "temperature"),
               output="latent 0 of the Perceiver, layer-normed (slide_representations()['image_embedding'])"),
    **_entries("titan", "MahmoodLab/TITAN",
               "TITAN-preview (MahmoodLab): ViT with 2-D ALiBi over CONCH v1.5 features of 512 px tiles at 20x, 768-d",
               family="titan", arch=TITAN_ARCH, tile_encoder="conch-v1.5", tile_px=512,
               state_prefix="vision_encoder.", ignored_prefixes=("text_encoder.",),
               positions="grid cells round((xy - min xy) / spacing), Euclidean ALiBi between cells",
               output="contrastive attentional pooler, before the text projection "
                      "(encode_slide_from_patch_features)"),
    **_entries("prov-gigapath-slide", "prov-gigapath/prov-gigapath",
               "Prov-GigaPath slide encoder: LongNet (12 layers, 768-d) over GigaPath tile features, 768-d",
               family="gigapath", arch=GIGAPATH_SLIDE_ARCH, tile_encoder="prov-gigapath", tile_px=256,
               weights_files=("slide_encoder.pth",), nested_key="model",
               positions="absolute cells round(xy / spacing) on a 1000 x 1000 grid, 2-D sine-cosine; "
                         "tiles in row-major order of their cells",
               output="mean of the tile tokens after layer 11 of 12, layer-normed (TRIDENT; feat_layer 11, "
                      "global_pool)"),
}


def registered_slide_encoder(name: str) -> SlideEncoderSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    raise EncoderError(f"unknown slide encoder {name!r}; registered: {', '.join(sorted(REGISTRY))}")


@dataclass
class SlideEncoder:
    """A frozen slide encoder and the facts a slide-embedding store's fingerprint needs about it."""

    spec: SlideEncoderSpec
    model: torch.nn.Module
    weights_id: str
    weights_sha256: str | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    def describe(self) -> dict[str, Any]:
        """Everything that changes the numbers."""
        spec = self.spec
        return {"name": spec.name, "weights_id": self.weights_id, "weights_sha256": self.weights_sha256,
                "tile_encoder": spec.tile_encoder, "tile_dim": spec.tile_dim, "tiling": {"tile_px": spec.tile_px,
                "target_mpp": spec.target_mpp}, "positions": spec.positions or "none", "output": spec.output,
                "dim": spec.embedding_dim}

    def check_tiles(self, encoder: Mapping[str, Any], tiling: Mapping[str, Any]) -> list[str]:
        """A tile store's fingerprint parts (encoder, tiling) against what this slide encoder reads: an
        EncoderError for features of another tile encoder or width (the numbers would mean nothing); notes for a
        tiling other than the card's (it runs, but it is not the published setting)."""
        spec, name = self.spec, str(encoder.get("name", ""))
        readable = {spec.tile_encoder} | ({f"{spec.tile_encoder}-random"} if self.weights_sha256 is None else set())
        if name not in readable or int(encoder.get("dim", -1)) != spec.tile_dim:
            raise EncoderError(f"{spec.name} reads {spec.tile_encoder} tile features ({spec.tile_dim}-d); this "
                               f"store holds {name or 'unnamed'} features ({encoder.get('dim')}-d)")
        notes = []
        if tiling.get("tile_px") != spec.tile_px or tiling.get("target_mpp") != spec.target_mpp:
            notes.append(f"{spec.name}'s card tiles {spec.tile_px} px at {spec.target_mpp} µm/px; this store tiles "
                         f"{tiling.get('tile_px')} px at {tiling.get('target_mpp')} µm/px")
        stride = tiling.get("stride_px")
        if stride is not None and stride != tiling.get("tile_px") and spec.positions:
            notes.append(f"tiles overlap (stride {stride} px): {spec.name} places one tile per grid cell")
        return notes

    @torch.inference_mode()
    def embed(self, features: torch.Tensor | np.ndarray, coords: torch.Tensor | np.ndarray,
              spacing_lv0: float) -> torch.Tensor:
        """One slide: tile features (N, D), their level-0 (x, y) corners (N, 2) and the level-0 distance between
        neighbouring tiles (the store's tile_px_level0 for non-overlapping tiles) → the (E,) float32 slide
        embedding, on the CPU."""
        param = next(self.model.parameters())
        tiles, xy = as_tiles(features, coords, spacing_lv0, self.spec.tile_dim, self.spec.name, param.device,
                             param.dtype)
        return self.model.embed(tiles, xy, float(spacing_lv0)).float().cpu()


def build_slide_model(spec: SlideEncoderSpec) -> torch.nn.Module:
    """The module of a registry entry, random-initialised from its seed (or on the meta device when the
    caller's context says so)."""
    if spec.family not in _FAMILIES:
        raise EncoderError(f"{spec.name}: unknown slide-encoder family {spec.family!r}")
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _FAMILIES[spec.family](**spec.arch)


def build_slide_encoder(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, *, meta: bool = False,
                        spec: SlideEncoderSpec | None = None) -> SlideEncoder:
    """Build a registered slide encoder (or `spec`, e.g. a small variant), frozen and in eval mode. `weights`
    overrides the registry's source (a hub id, a file, a folder holding the published file). `meta=True`: the
    model stays on the meta device and a weights file is hashed, not read (describe() without building)."""
    spec = spec or registered_slide_encoder(name)
    source = weights if weights is not None else spec.weights
    path = None if source is None else resolve_weights_file(source, spec.weights_files, spec.name)
    with torch.device("meta") if meta or path is not None else contextlib.nullcontext():
        model = build_slide_model(spec)  # no random init to throw away when a file fills it
    if path is None:
        weights_id, digest = f"random-init:seed={spec.seed}", None
    else:
        if not meta:
            load_slide_state(model, read_state_dict(path, spec.nested_key), spec.state_prefix,
                             spec.ignored_prefixes, str(path))
        is_local = Path(source).expanduser().exists()
        weights_id, digest = (path.name if is_local else source), sha256_file(path)
    model.eval().requires_grad_(False)
    if not meta:
        model.to(device=device, dtype=dtype)
    return SlideEncoder(spec=spec, model=model, weights_id=weights_id, weights_sha256=digest)
