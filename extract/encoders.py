"""Tile encoders: a small registry of frozen ViTs of the Virchow-2 family.

This module needs only torch, timm, safetensors and huggingface_hub, so GPU benchmarks can import it
from a bare source tree. Preprocessing travels with the model (timm's pretrained_cfg), never retyped.

Tile embedding (what the store keeps) = class token ‖ mean of the patch tokens, registers excluded:
    tokens (B, 1 + R + P, C) → concat(tokens[:, 0], tokens[:, 1 + R:].mean(1)) → (B, 2C)
Several public tools get this wrong (class token only, or registers averaged in).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import SwiGLUPacked

from store.errors import EncoderError  # pure Python: importable without zarr

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Virchow-2's own pretrained_cfg (bicubic resize to 224, ImageNet mean/std, no crop).
_VIRCHOW2_PRETRAINED_CFG = dict(
    input_size=(3, 224, 224),
    interpolation="bicubic",
    crop_pct=1.0,
    crop_mode="center",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    license="CC-BY-NC-ND-4.0",
)

# The architecture as published with the weights (paige-ai/Virchow2 config.json), plus the two
# callables that config cannot carry.
VIRCHOW2_ARCH: dict[str, Any] = dict(
    img_size=224,
    init_values=1e-5,
    num_classes=0,
    reg_tokens=4,
    mlp_ratio=5.3375,
    global_pool="",
    dynamic_img_size=True,
)
# Same family at test size. 5.3375 * 64 is odd, which fails timm's even-hidden assert for SwiGLU.
TINY_ARCH: dict[str, Any] = dict(VIRCHOW2_ARCH, embed_dim=64, depth=2, num_heads=2, mlp_ratio=5.3125)
# ViT-S width and depth (~26M parameters, ~14 GFLOP per tile): heavy enough to dominate a CPU pipeline
# in benchmarks while still running at a few tiles/s on one core.
SMALL_ARCH: dict[str, Any] = dict(VIRCHOW2_ARCH, embed_dim=384, depth=12, num_heads=6, mlp_ratio=5.3334)

VIRCHOW2_HUB_ID = "paige-ai/Virchow2"
WEIGHTS_FILENAME = "model.safetensors"


@dataclass(frozen=True)
class EncoderSpec:
    """What a registry entry builds. `weights` is a hub id, a local path, or None (random init)."""

    name: str
    arch: dict[str, Any]
    weights: str | None = None
    description: str = ""
    seed: int = 0

    @property
    def timm_name(self) -> str:
        return "vit_huge_patch14_224"


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
}


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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return 2 * self.width

    def describe(self) -> dict[str, Any]:
        """The encoder part of a store fingerprint: everything that changes the numbers."""
        cfg = self.data_config
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "weights_sha256": self.weights_sha256,
            "pooling": "cls+mean_patch(no_registers)",
            "preprocessing": {
                "input_size": list(cfg["input_size"]),
                "interpolation": cfg["interpolation"],
                "mean": [float(v) for v in cfg["mean"]],
                "std": [float(v) for v in cfg["std"]],
            },
            "dim": self.embedding_dim,
        }

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels → (B, 1 + R + P, C) tokens."""
        return self.model(pixels)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels → (B, 2C) class ‖ mean(patch tokens, registers excluded)."""
        return pool_tile_embedding(self.tokens(pixels), self.num_prefix_tokens)


def pool_tile_embedding(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, 1 + R + P, C) → (B, 2C). Index 0 is the class token; 1..R are registers, skipped."""
    cls = tokens[:, 0]  # (B, C)
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


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _resolve_weights_file(weights: str) -> Path:
    """A local .safetensors file, a directory holding model.safetensors, or a hub id (HF_TOKEN)."""
    local = Path(weights).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        candidate = local / WEIGHTS_FILENAME
        if candidate.is_file():
            return candidate
        raise EncoderError(f"{local} holds no {WEIGHTS_FILENAME}: point --weights at the .safetensors file")
    if weights.startswith((".", "/", "~")) or weights.count("/") != 1:
        raise EncoderError(f"weights {weights!r}: no such file, and not a hub id of the form owner/name")
    from huggingface_hub import hf_hub_download  # imported late: no network probe at import time
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # huggingface_hub reads HF_TOKEN from the environment itself; we never touch the value.
        return Path(hf_hub_download(weights, WEIGHTS_FILENAME))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise EncoderError(
            f"could not fetch {WEIGHTS_FILENAME} of {weights!r} ({type(e).__name__}). The weights are gated: "
            "accept the licence on the hub and set HF_TOKEN, or pass a local .safetensors path"
        ) from e


def _load_safetensors(model: torch.nn.Module, path: Path) -> None:
    """Fill `model` (built on the meta device: no memory, no random init) with the file's tensors."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise EncoderError(f"{path}: only .safetensors weights are loaded (pickled checkpoints can run code)")
    # fp32 as the initialised model was (a bf16 file would otherwise make a bf16 model); .float() of fp32 is free
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left_empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                  if t.is_meta and name not in missing]  # e.g. a buffer no state dict holds
    if missing or unexpected or left_empty:
        raise EncoderError(
            f"{path} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            + (f", {len(left_empty)} tensors left unfilled (e.g. {left_empty[:3]})" if left_empty else "")
        )


PATCH_PX = 14  # every registered encoder is a ViT-H/14-family model (vit_huge_patch14_224 below)


def patch_grid(name: str) -> int:
    """Patches per side at the encoder's input size, without building it (16 for Virchow-2 at 224 px)."""
    if name not in REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return int(REGISTRY[name].arch["img_size"]) // PATCH_PX


def build_vit(arch: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The timm ViT for an architecture dict, random-initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            "vit_huge_patch14_224",
            pretrained=False,
            mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU,
            pretrained_cfg_overlay=_VIRCHOW2_PRETRAINED_CFG,
            **arch,
        )


def build_encoder(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    meta: bool = False,
) -> TileEncoder:
    """Build a registered encoder, frozen and in eval mode. `weights` overrides the registry's source.
    `meta=True`: the model stays on the meta device and a weights file is hashed but not read: describe()
    and the widths without building it (a rerun over a complete store checks its fingerprint so)."""
    if name not in REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[name]
    source = weights if weights is not None else spec.weights
    path = None if source is None else _resolve_weights_file(source)
    # Weights from a file: built without initialising (the full ViT-H's random init takes 13 s on 2 cores,
    # for 2.5 GB that the file's tensors replace at once).
    with torch.device("meta") if meta or path is not None else contextlib.nullcontext():
        model = build_vit(spec.arch, spec.seed)
    if path is None:
        weights_id, digest = f"random-init:seed={spec.seed}", None
    else:
        if not meta:
            _load_safetensors(model, path)
        is_local = Path(source).expanduser().exists()
        weights_id, digest = (path.name if is_local else source), sha256_file(path)
    model.eval().requires_grad_(False)
    if not meta:
        model.to(device=device, dtype=dtype)
    grid = model.patch_embed.grid_size[0]
    return TileEncoder(
        name=name,
        model=model,
        data_config=resolve_model_data_config(model),
        weights_id=weights_id,
        weights_sha256=digest,
        num_prefix_tokens=model.num_prefix_tokens,
        width=model.embed_dim,
        grid=grid,
    )
