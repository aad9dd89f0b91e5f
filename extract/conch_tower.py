"""CONCH v1.5's vision tower (MahmoodLab/conchv1_5; TITAN's tile encoder) as a tokens-out module like the timm
ViTs of extract.tile_encoders, plus the attentional pooling that makes its 768-d tile embedding.

Learnt from the public model code: TRIDENT (mahmoodlab/TRIDENT at a91fa8490e02, trident/patch_encoder_models/
model_zoo/conchv1_5/conchv1_5.py and load.py) and the TITAN hub repository's conch_v1_5.py and config.json
(copied into DIAGNijmegen/unicorn_baseline at dec380918e3b, src/unicorn_baseline/vision/pathology/titan/). A
ViT-L/16 trunk (1024-d, 24 layers, 16 heads, layer scale, qkv bias) built at 224 px, so its position table is
14 x 14 + class, and run at 448 px, the table resized to 28 x 28 the DINO way (bicubic by scale factor
(28 + 0.1) / 14: not timm's resize by size, whose sampling points differ slightly); then one learned query
attends over all final tokens (8 heads, 768-d) and a LayerNorm gives the embedding. Parameter names are the
published ones: trunk.* (timm's ViT names), attn_pool_contrast.*, ln_contrast.*. Preprocessing on the card:
resize to 448 (bilinear), centre-crop 448, ImageNet mean and std; TITAN reads 512 px tiles at 20x."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def dino_resized(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(1, 1 + g*g, C) class + patch table → (1, 1 + rows*cols, C), as DINO / iBOT / CONCH resize it."""
    g = int(math.sqrt(pos_embed.shape[1] - 1))
    if rows * cols == g * g and rows == cols:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / g, (cols + 0.1) / g), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


class _DinoResizedViT(VisionTransformer):
    """timm's ViT (dynamic image size: patch tokens arrive as (B, H, W, C)) with the DINO-style table resize."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, rows, cols, c = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, rows * cols, c)], dim=1)
        return self.pos_drop(x + dino_resized(self.pos_embed, rows, cols))


class AttentionalPooler(nn.Module):
    """Learned queries (normed) attend to the normed tokens; bias-free projections, `heads` heads."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, context_dim) → (B, queries, dim)."""
        b, t, _ = tokens.shape
        k, v = self.to_kv(self.ln_k(tokens)).view(b, t, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = self.to_q(self.ln_q(self.query)).view(1, -1, self.heads, k.shape[-1]).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class ConchV15Tower(nn.Module):
    """forward: pixels (B, 3, 448, 448) → tokens (B, 1 + 784, 1024), final norm applied; pool: → (B, 768)."""

    num_prefix_tokens = 1

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 init_values: float, pooled_dim: int, pooler_heads: int, **vit: Any) -> None:
        super().__init__()
        self.embed_dim, self.pooled_dim = embed_dim, pooled_dim
        self.trunk = _DinoResizedViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=init_values,
                                     num_classes=0, global_pool="", dynamic_img_size=True, **vit)
        self.attn_pool_contrast = AttentionalPooler(pooled_dim, embed_dim, pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(pooled_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
