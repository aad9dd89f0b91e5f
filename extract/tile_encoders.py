"""Tile encoders: a registry of the frozen pathology foundation models users compare, built with timm or
transformers (never `trust_remote_code`), random-init variants of the same architectures for tests and speed.

This module needs only torch, timm, safetensors and huggingface_hub (transformers for Phikon-v2), so GPU
benchmarks can import it from a bare source tree. Every encoder sees the 224 px tile at 0.5 µm/px as it is, except
CONCH v1.5 (TITAN's tile encoder): its card resizes a 512 px tile at 0.5 µm/px to 448 px (`tile_px`: the tile the
card prescribes, configs/extract/conch-v1.5.yaml; `input_px`: what the model sees).

The tile embedding is each model card's own output (the registry says which pooling: slidecache.tile_embeddings;
for Virchow-2 the class token ‖ the mean of the patch tokens, registers left out, which several public tools
get wrong). Weights are found and read by extract.encoder_weights.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked

from extract.encoder_weights import (
    HF_CONFIG,
    STATE_DICT_FILENAME,
    WEIGHTS_FILENAME,
    gated_and_random,
    load_weights,
    resolve_weights_file,
    sha256_file,
)
from slidecache.errors import EncoderError  # pure Python: importable without zarr
from slidecache.tile_embeddings import ATTN_POOL, CLS, CLS_MEAN_PATCH, POOLINGS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0 and -1's model cards: their own normalisation, not ImageNet's.
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
INPUT_PX = 224  # the input of every encoder but CONCH v1.5 (448): the 224 px tile at 0.5 µm/px, as it is


_SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
# The architecture as published with the weights (paige-ai/Virchow2 config.json), plus the two
# callables that config cannot carry.
VIRCHOW2_ARCH: dict[str, Any] = dict(
    img_size=INPUT_PX,
    init_values=1e-5,
    num_classes=0,
    reg_tokens=4,
    mlp_ratio=5.3375,
    global_pool="",
    dynamic_img_size=True,
    **_SWIGLU,
)
# Same family at test size. 5.3375 * 64 is odd, which fails timm's even-hidden assert for SwiGLU.
TINY_ARCH: dict[str, Any] = dict(VIRCHOW2_ARCH, embed_dim=64, depth=2, num_heads=2, mlp_ratio=5.3125)
# ViT-S width and depth (~26M parameters, ~14 GFLOP per tile): heavy enough to dominate a CPU pipeline
# in benchmarks while still running at a few tiles/s on one core.
SMALL_ARCH: dict[str, Any] = dict(VIRCHOW2_ARCH, embed_dim=384, depth=12, num_heads=6, mlp_ratio=5.3334)
# UNI2-h's model card (MahmoodLab/UNI2-h: timm_kwargs for vit_giant_patch14_224).
UNI2H_ARCH: dict[str, Any] = dict(
    img_size=INPUT_PX, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
    global_pool="", **_SWIGLU,
)
# H-optimus-0/1 (bioptimus): timm's vit_giant_patch14_reg4_dinov2 (ViT-g/14, 4 registers, SwiGLU) at 224 px.
HOPTIMUS_ARCH: dict[str, Any] = dict(img_size=INPUT_PX, init_values=1e-5, num_classes=0, global_pool="",
                                     dynamic_img_size=True)
# Prov-GigaPath's tile encoder (its hub config.json): vit_giant_patch14_dinov2 with 16 px patches at 224 px.
GIGAPATH_ARCH: dict[str, Any] = dict(img_size=INPUT_PX, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                                     mlp_ratio=5.33334, num_classes=0, global_pool="", dynamic_img_size=True)
# Virchow (v1) (paige-ai/Virchow config.json): Virchow-2's timm kwargs without registers; PRISM reads its tiles.
VIRCHOW_ARCH: dict[str, Any] = {k: v for k, v in VIRCHOW2_ARCH.items() if k != "reg_tokens"}
# CONCH v1.5 (TITAN's config.json conch_config; TRIDENT's conchv1_5.py): ViT-L/16 built at 224 px, run at 448,
# attention-pooled to 768-d (extract/conch_tower.py).
CONCH15_ARCH: dict[str, Any] = dict(img_size=INPUT_PX, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                    mlp_ratio=4.0, init_values=1e-6, pooled_dim=768, pooler_heads=8)
CONCH15_PX = 448
# Phikon-v2 (owkin/phikon-v2 config.json): a transformers Dinov2Model, ViT-L/16, no registers.
PHIKON2_ARCH: dict[str, Any] = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                                    image_size=INPUT_PX, mlp_ratio=4, layerscale_value=1e-5, layer_norm_eps=1e-6,
                                    use_swiglu_ffn=False, qkv_bias=True, hidden_act="gelu")

VIRCHOW2_HUB_ID = "paige-ai/Virchow2"


@dataclass(frozen=True)
class EncoderSpec:
    """What a registry entry builds. `weights` is a hub id, a local path, or None (random init)."""

    name: str
    arch: dict[str, Any]
    weights: str | None = None
    description: str = ""
    seed: int = 0
    timm_model: str = "vit_huge_patch14_224"  # "" for a transformers Dinov2Model
    pooling: str = CLS_MEAN_PATCH
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_px: int = 14
    # The files its hub repository ships, in the order tried (a hub id downloads the first that exists).
    weights_files: tuple[str, ...] = (WEIGHTS_FILENAME,)
    # What the model card prescribes that feeding the 224 px tile as it is leaves out ("" where nothing).
    input_deviation: str = ""
    input_px: int = INPUT_PX  # the model's input side: tiles are resized to it
    tile_px: int = INPUT_PX  # the tile side at 0.5 µm/px the card prescribes
    interpolation: str = "bicubic"  # how the card resizes
    builder: str = ""  # our own module (_builder) instead of timm or transformers

    @property
    def library(self) -> str:
        return "slidecache" if self.builder else "timm" if self.timm_model else "transformers"

    @property
    def grid(self) -> int:
        """Patches per side at the model's input size."""
        return self.input_px // self.patch_px

    def variant(self, name: str, weights: str | None = None, seed: int | None = None, **arch: Any) -> EncoderSpec:
        """The same family with some architecture fields changed (e.g. depth=1), random-init unless weights."""
        depth_key = "num_hidden_layers" if self.library == "transformers" else "depth"
        changes = {depth_key if k == "depth" else k: v for k, v in arch.items()}
        return replace(self, name=name, arch={**self.arch, **changes}, weights=weights,
                       seed=self.seed if seed is None else seed)


_TIMM_FILES = (WEIGHTS_FILENAME, STATE_DICT_FILENAME)
_BUILD_LOCK = threading.Lock()  # build_model: random init from the global generator, one build at a time

_entries = partial(gated_and_random, EncoderSpec)  # a gated hub model and its random-init twin

REGISTRY: dict[str, EncoderSpec] = {
    "virchow2": EncoderSpec(
        "virchow2", VIRCHOW2_ARCH, VIRCHOW2_HUB_ID,
        "Virchow-2 ViT-H/14 (632M), gated weights: hub id with HF_TOKEN, or a local .safetensors",
    ),
    "virchow2-random": EncoderSpec(
        "virchow2-random", VIRCHOW2_ARCH, None,
        "Virchow-2 architecture with random weights (seed 0): for shapes, speed and GPU benchmarks",
    ),
    "virchow2-small": EncoderSpec(
        "virchow2-small", SMALL_ARCH, None,
        "Virchow-2 family at ViT-S size (width 384, depth 12), random weights (seed 0): CPU benchmarks",
    ),
    "virchow2-tiny": EncoderSpec(
        "virchow2-tiny", TINY_ARCH, None,
        "Virchow-2 family at test size (width 64, depth 2), random weights (seed 0)",
    ),
    **_entries("uni2-h", "MahmoodLab/UNI2-h", "UNI2-h ViT-H/14 (681M, 8 registers), class token 1536-d",
               arch=UNI2H_ARCH, timm_model="vit_giant_patch14_224", pooling=CLS, weights_files=_TIMM_FILES),
    **_entries("h-optimus-1", "bioptimus/H-optimus-1", "H-optimus-1 ViT-g/14 (1.1B, 4 registers), class token 1536-d",
               arch=HOPTIMUS_ARCH, timm_model="vit_giant_patch14_reg4_dinov2", pooling=CLS, mean=HOPTIMUS_MEAN,
               std=HOPTIMUS_STD, weights_files=_TIMM_FILES),
    **_entries("h-optimus-0", "bioptimus/H-optimus-0", "H-optimus-0 ViT-g/14 (1.1B, 4 registers), class token 1536-d",
               arch=HOPTIMUS_ARCH, timm_model="vit_giant_patch14_reg4_dinov2", pooling=CLS, mean=HOPTIMUS_MEAN,
               std=HOPTIMUS_STD, weights_files=_TIMM_FILES),
    **_entries("prov-gigapath", "prov-gigapath/prov-gigapath",
               "Prov-GigaPath tile encoder ViT-g/16 (1.1B), class token 1536-d",
               arch=GIGAPATH_ARCH, timm_model="vit_giant_patch14_dinov2", pooling=CLS, patch_px=16,
               weights_files=_TIMM_FILES,
               input_deviation="model card: resize to 256 px (bicubic), centre-crop 224; fed the 224 px tile as it is"),
    **_entries("virchow", "paige-ai/Virchow", "Virchow ViT-H/14 (632M, no registers), class ‖ mean patch 2560-d",
               arch=VIRCHOW_ARCH, weights_files=_TIMM_FILES),
    **_entries("conch-v1.5", "MahmoodLab/conchv1_5",
               "CONCH v1.5 ViT-L/16 at 448 px (TITAN's tile encoder), attention-pooled 768-d",
               arch=CONCH15_ARCH, timm_model="", builder="conch-v1.5", pooling=ATTN_POOL, patch_px=16,
               input_px=CONCH15_PX, tile_px=512, interpolation="bilinear",
               weights_files=("pytorch_model_vision.bin",)),
    **_entries("phikon-v2", "owkin/phikon-v2", "Phikon-v2 ViT-L/16 (307M, transformers Dinov2), class token 1024-d",
               arch=PHIKON2_ARCH, timm_model="", pooling=CLS, patch_px=16, weights_files=(WEIGHTS_FILENAME,)),
}

# Names that are not tile encoders here, and why (a hub's own model code is never run: trust_remote_code).
REMOTE_CODE_ONLY: dict[str, str] = {
    "titan": "TITAN (MahmoodLab/TITAN) is a slide encoder: extract.slide_encoders builds it from our own code "
             "(its hub loads only with trust_remote_code); its tile encoder is registered as 'conch-v1.5'",
    "conch": "CONCH v1 loads only through MahmoodLab's own conch package's model code; CONCH v1.5 is registered "
             "as 'conch-v1.5' (our own code; its hub loads through TITAN's trust_remote_code)",
    "prism": "PRISM (paige-ai/Prism) is a slide encoder: extract.slide_encoders builds it from our own code (its "
             "hub loads only with trust_remote_code); its tile encoder is registered as 'virchow'",
}


def registered(name: str) -> EncoderSpec:
    """The registry entry, or an error naming what is registered (and why a remote-code model is not)."""
    if name in REGISTRY:
        return REGISTRY[name]
    key = name.lower().split("-v")[0].split("_")[0]
    if key in REMOTE_CODE_ONLY:
        raise EncoderError(f"encoder {name!r} is not supported: {REMOTE_CODE_ONLY[key]}, and slidecache never "
                           "runs a repository's code (trust_remote_code). Registered: " + ", ".join(sorted(REGISTRY)))
    raise EncoderError(f"unknown encoder {name!r}; registered: {', '.join(sorted(REGISTRY))}")


@dataclass
class TileEncoder:
    """A frozen ViT plus the facts the store fingerprint needs about it."""

    name: str
    model: torch.nn.Module
    data_config: dict[str, Any]
    weights_id: str
    weights_sha256: str | None
    num_prefix_tokens: int  # class + registers
    width: int  # C, the token width
    grid: int  # patches per side at the native input size
    pooling: str = CLS_MEAN_PATCH
    input_deviation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.pooled_dim) if self.pooling == ATTN_POOL else pooled_width(self.pooling, self.width)

    def describe(self) -> dict[str, Any]:
        """The encoder part of a store fingerprint: everything that changes the numbers."""
        cfg = self.data_config
        deviation = {"input_deviation": self.input_deviation} if self.input_deviation else {}
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "weights_sha256": self.weights_sha256,
            "pooling": self.pooling,
            "preprocessing": {
                "input_size": list(cfg["input_size"]),
                "interpolation": cfg["interpolation"],
                "mean": [float(v) for v in cfg["mean"]],
                "std": [float(v) for v in cfg["std"]],
                **deviation,
            },
            "dim": self.embedding_dim,
        }

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels → (B, 1 + R + P, C) tokens."""
        return self.model(pixels)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + R + P, C) tokens → (B, D), the tile embedding: by the token rule of the encoder's pooling, or
        by its model's own pooler (CONCH v1.5's attention pooling has weights)."""
        if self.pooling == ATTN_POOL:
            return self.model.pool(tokens)
        return pool_tile_embedding(tokens, self.num_prefix_tokens, self.pooling)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels → (B, D), the tile embedding of the encoder's pooling."""
        return self.pool(self.tokens(pixels))


def pooled_width(pooling: str, width: int) -> int:
    """The tile embedding's width from a token width of `width`, by the pooling's token rule."""
    return 2 * width if pooling == CLS_MEAN_PATCH else width


def pool_tile_embedding(tokens: torch.Tensor, num_prefix_tokens: int, pooling: str = CLS_MEAN_PATCH) -> torch.Tensor:
    """(B, 1 + R + P, C) → (B, 2C) class ‖ mean(patch tokens) or (B, C) class token. Index 0 is the class
    token; 1..R are registers, never averaged in."""
    if pooling not in POOLINGS:
        raise EncoderError(f"unknown pooling {pooling!r}: {', '.join(POOLINGS)}")
    if pooling == ATTN_POOL:
        raise EncoderError(f"pooling {ATTN_POOL!r} has weights: use TileEncoder.pool(tokens), not the token rule")
    cls = tokens[:, 0]  # (B, C)
    if pooling == CLS:
        return cls
    patch_mean = tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, C)
    return torch.cat([cls, patch_mean], dim=-1)


def pool_token_grid(tokens: torch.Tensor, num_prefix_tokens: int, out_grid: int) -> torch.Tensor:
    """Patch tokens (B, P, C) as a (g x g) grid, average-pooled to (B, out_grid**2, C)."""
    patches = tokens[:, num_prefix_tokens:]  # (B, P, C)
    b, p, c = patches.shape
    g = int(round(p**0.5))
    if g * g != p or g % out_grid:
        raise EncoderError(f"cannot pool a {g}x{g} patch grid to {out_grid}x{out_grid}: {g} must be a multiple")
    grid = patches.transpose(1, 2).reshape(b, c, g, g)  # (B, C, g, g)
    pooled = torch.nn.functional.avg_pool2d(grid, kernel_size=g // out_grid)  # (B, C, o, o)
    return pooled.flatten(2).transpose(1, 2)  # (B, o*o, C)


def patch_grid(name: str) -> int:
    """Patches per side at the encoder's input size, without building it (16 for Virchow-2 at 224 px, 28 for
    CONCH v1.5 at 448)."""
    return registered(name).grid


class _Dinov2Tokens(torch.nn.Module):
    """A transformers Dinov2Model as a tokens-out module like a timm ViT's (final layer norm applied)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_prefix_tokens = 1
        self.embed_dim = int(backbone.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixels).last_hidden_state


def _dinov2_config(spec: EncoderSpec, weights_file: Path | None) -> Any:
    """The registry's Dinov2 config; with a checkpoint, its own config.json, checked against the registry."""
    from transformers import Dinov2Config

    if weights_file is None:
        return Dinov2Config(**spec.arch)
    config = Dinov2Config.from_json_file(str(weights_file.parent / HF_CONFIG))
    differs = {k: (getattr(config, k, None), v) for k, v in spec.arch.items()
               if k not in ("image_size",) and getattr(config, k, None) != v}
    if differs:
        raise EncoderError(f"{weights_file.parent / HF_CONFIG} is not {spec.name}'s architecture: "
                           + "; ".join(f"{k}: file {a!r}, {spec.name} {b!r}" for k, (a, b) in differs.items()))
    config.image_size = INPUT_PX  # position embeddings are interpolated to the tile; the file's grid is kept
    return config


def build_model(spec: EncoderSpec, weights_file: Path | None = None) -> torch.nn.Module:
    """The model of a registry entry, random-initialised from its fixed seed (or on the meta device when the
    caller's context says so). Tokens out: (B, 1 + R + P, C) with the final norm applied. One build at a
    time: the seed is torch's global generator, and encoders built on threads at once (the local executor
    with several stores) drew from it in turn, so each got other weights than its seed's."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.builder:
            return _builder(spec.builder)(**spec.arch)
        if spec.library == "timm":
            return timm.create_model(spec.timm_model, pretrained=False, pretrained_cfg_overlay=_pretrained_cfg(spec),
                                     **spec.arch)
        from transformers import Dinov2Model

        return _Dinov2Tokens(Dinov2Model(_dinov2_config(spec, weights_file)))


def _builder(name: str) -> Any:
    """Our own module for an architecture timm and transformers do not have as published (imported late)."""
    if name == "conch-v1.5":
        from extract.conch_tower import ConchV15Tower

        return ConchV15Tower
    raise EncoderError(f"unknown encoder builder {name!r}")


def _pretrained_cfg(spec: EncoderSpec) -> dict[str, Any]:
    """The preprocessing of the model card: its resize to the input size (bicubic to 224, bilinear to 448 for
    CONCH v1.5), the card's mean/std, no crop (tiles are square)."""
    return dict(input_size=(3, spec.input_px, spec.input_px), interpolation=spec.interpolation, crop_pct=1.0,
                crop_mode="center", mean=spec.mean, std=spec.std)


def build_encoder(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    meta: bool = False,
    spec: EncoderSpec | None = None,
) -> TileEncoder:
    """Build a registered encoder (or `spec`, e.g. a depth-1 variant), frozen and in eval mode. `weights`
    overrides the registry's source. `meta=True`: the model stays on the meta device and a weights file is
    hashed but not read: describe() and the widths without building it (a rerun over a complete store checks
    its fingerprint so)."""
    spec = spec or registered(name)
    source = weights if weights is not None else spec.weights
    path = None if source is None else resolve_weights_file(source, spec.weights_files, spec.name,
                                                           needs_config=spec.library == "transformers")
    # Weights from a file: built without initialising (the full ViT-H's random init takes 13 s on 2 cores,
    # for 2.5 GB that the file's tensors replace at once).
    with torch.device("meta") if meta or path is not None else contextlib.nullcontext():
        model = build_model(spec, path)
    if path is None:
        weights_id, digest = f"random-init:seed={spec.seed}", None
    else:
        if not meta:
            load_weights(model.backbone if isinstance(model, _Dinov2Tokens) else model, path)
        is_local = Path(source).expanduser().exists()
        weights_id, digest = (path.name if is_local else source), sha256_file(path)
    model.eval().requires_grad_(False)
    if not meta:
        model.to(device=device, dtype=dtype)
    return TileEncoder(
        name=spec.name,
        model=model,
        data_config=_pretrained_cfg(spec),
        weights_id=weights_id,
        weights_sha256=digest,
        num_prefix_tokens=int(model.num_prefix_tokens),
        width=int(model.embed_dim),
        grid=spec.grid,
        pooling=spec.pooling,
        input_deviation=spec.input_deviation,
    )
