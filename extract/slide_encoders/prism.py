"""PRISM's slide encoder (Shaikovski et al. 2024, paige-ai/Prism): a Perceiver resampler whose 1 + 512 learned
latents read a slide's Virchow (v1) tile embeddings (2560-d, class ‖ mean patch) by cross-attention, then talk
among themselves; latent 0, layer-normed, is the 1280-d slide embedding, the other 512 the image latents PRISM's
BioGPT report decoder attends to (prism_decoder.py).

Written from the hub repository's model code (perceiver.py, configuring_prism.py and config.json, as copied into
the public repository DIAGNijmegen/unicorn_baseline at commit dec380918e3b, src/unicorn_baseline/vision_language/
prism/). Parameter names and shapes are that code's `image_resampler` state dict, weight sharing included: cross-
attention layers 2-7 are layer 1's module and every layer's latent transformer is layer 0's, so one tensor has
several names (load_slide_state accepts a file that keeps one of them). No position input: the model sees a set
of tiles, and its output does not depend on their order."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# paige-ai/Prism config.json, perceiver_config
PRISM_ARCH: dict[str, Any] = dict(latent_seq=512, latent_dim=1280, context_dim=2560, mhsa_heads=8, perceiver_depth=8,
                                  transformer_depth=6, share_xattn_start_layer=1, share_tf_start_layer=0,
                                  xattn_heads=1, mlp_mult=1)


class _GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class _FeedForward(nn.Module):
    """Pre-norm GEGLU MLP; `net.0` and `net.2` are the published names."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), _GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class _CrossAttention(nn.Module):
    """Latents (normed) attend to the tiles (not normed: PRISM leaves the 2560-d context as it is)."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.x_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) tiles → keys and values (B, heads, N, d), computed once per shared module."""
        b, n, _ = context.shape
        kv = self.to_kv(context).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        b, q_len, dim = x.shape
        q = self.to_q(self.x_norm(x)).view(b, q_len, self.heads, -1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N): True = a tile, False = padding
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, dim))


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention of the latents, torch's own module (bias-free) as published."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.mha(x, x, x, need_weights=False)[0]


class _Perceiver(nn.Module):
    def __init__(self, latent_seq: int, latent_dim: int, context_dim: int, mhsa_heads: int, perceiver_depth: int,
                 transformer_depth: int, share_xattn_start_layer: int, share_tf_start_layer: int, xattn_heads: int,
                 mlp_mult: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latent_seq, latent_dim))
        layers: list[nn.ModuleDict] = []
        for i in range(perceiver_depth):
            # from layer share_*_start_layer + 1 on, a layer reuses the previous layer's module (shared weights)
            xattn = nn.ModuleDict({"xattn": _CrossAttention(latent_dim, context_dim, xattn_heads),
                                   "ff": _FeedForward(latent_dim, mlp_mult)}) \
                if i <= share_xattn_start_layer else layers[-1]["xattn"]
            tf = nn.ModuleList(nn.ModuleDict({"mhsa": _SelfAttention(latent_dim, mhsa_heads),
                                              "ff": _FeedForward(latent_dim, mlp_mult)})
                               for _ in range(transformer_depth)) if i <= share_tf_start_layer else layers[-1]["tf"]
            layers.append(nn.ModuleDict({"xattn": xattn, "tf": tf}))
        self.layers = nn.ModuleList(layers)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one key/value projection per shared module
        for layer in self.layers:
            xattn = layer["xattn"]
            attention = xattn["xattn"]
            if id(attention) not in cache:
                cache = {id(attention): attention.keys_values(context)}  # the previous one is never used again
            x = attention(x, cache[id(attention)], mask) + x
            x = xattn["ff"](x) + x
            for block in layer["tf"]:
                x = block["mhsa"](x) + x
                x = block["ff"](x) + x
        return x


class PrismResampler(nn.Module):
    """The `image_resampler` of paige-ai/Prism: tiles (B, N, 2560) → slide embedding (B, 1280) and image latents
    (B, 512, 1280). `mask` (B, N), True for a tile, False for padding, lets slides of different sizes share a
    batch; a padded slide gets what it gets alone."""

    def __init__(self, latent_seq: int, latent_dim: int, **arch: Any) -> None:
        super().__init__()
        self.embedding_dim = latent_dim
        self.cls_norm = nn.LayerNorm(latent_dim)
        self.img_norm = nn.LayerNorm(latent_dim)
        self.perceiver = _Perceiver(1 + latent_seq, latent_dim, **arch)  # + 1: the slide-embedding latent

    def forward(self, tiles: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.perceiver(tiles, mask)
        return self.cls_norm(x[:, 0]), self.img_norm(x[:, 1:])

    def embed(self, tiles: torch.Tensor, coords: torch.Tensor, spacing: float) -> torch.Tensor:
        """One slide: (N, 2560) tiles → (1280,). Positions are not used (PRISM reads a set)."""
        return self(tiles.unsqueeze(0))[0][0]
