"""TITAN's slide encoder (Ding et al. 2024, MahmoodLab/TITAN, "TITAN-preview"): a 6-layer ViT over CONCH v1.5
tile features (768-d) laid out on the slide's 2-D tile grid, with ALiBi (each head's attention score lowered in
proportion to the Euclidean distance between two tiles' grid cells) in place of position embeddings; the slide
embedding is the contrastive attentional pooler's one query over the final tokens, 768-d, before the projection
to the text space (`encode_slide_from_patch_features`, no_proj=True).

Written from the hub repository's model code (vision_transformer.py, configuration_titan.py, config.json and
modeling_titan.py, as copied into the public repository DIAGNijmegen/unicorn_baseline at commit dec380918e3b,
src/unicorn_baseline/vision/pathology/titan/); TRIDENT (mahmoodlab/TRIDENT, trident/slide_encoder_models/load.py)
calls it with the features, the level-0 coordinates and the level-0 distance between neighbouring tiles (512 at
20x, 1024 at 40x). Parameter names and shapes are the `vision_encoder` part of that code's state dict.

What the published forward does for one slide, and so do we: tiles go to grid cells round((xy - min xy) / spacing)
(the reference floors; the two agree on a tile grid, and rounding also places corners stored rounded from a
spacing that is not a whole number of pixels); a tile whose features are all zero is background and dropped, as
the reference's background mask does; the tokens are the class token and the tissue cells. Two tiles in one cell
(overlapping tiles) are refused: the reference would silently add their features. Only relative positions enter,
so the output depends neither on the tiles' order nor on where the slide sits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extract.slide_encoders.attention import biased_attention
from extract.slide_encoders.tiles import grid_cells
from slidecache.errors import EncoderError

# MahmoodLab/TITAN config.json, vision_config (attentional_pool "parallel", as TitanConfig sets it)
TITAN_ARCH: dict[str, Any] = dict(embed_dim=768, depth=6, num_heads=12, mlp_ratio=4.0, tile_dim=768,
                                  pooler_queries=128, pooler_heads=8)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric series from 2^(-8/n); a head count that is not a
    power of two takes the power below, then every other slope of the power above."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    below = 2 ** math.floor(math.log2(heads))
    return power_of_two(below) + power_of_two(2 * below)[0::2][: heads - below]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias_rows: Any) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = biased_attention(q, k, v, bias_rows)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, bias_rows: Any) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias_rows)
        return x + self.mlp(self.norm2(x))


class _Blocks(nn.Module):
    """Only for the published names: blocks.modules_list.{i}."""

    def __init__(self, blocks: list[_Block]) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class _QueryPooler(nn.Module):
    """Learned queries (normed) attend to the normed tokens through torch's multi-head attention."""

    def __init__(self, dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, keys, keys, need_weights=False)[0]  # (B, queries, dim)


class TitanSlideEncoder(nn.Module):
    """The `vision_encoder` of MahmoodLab/TITAN. `attn_pool` (128 queries) and `proj` are published weights the
    slide embedding does not use (they feed the text side); they are loaded, not run."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, tile_dim: int,
                 pooler_queries: int, pooler_heads: int) -> None:
        super().__init__()
        self.embedding_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = nn.Sequential(nn.Linear(tile_dim, embed_dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = _Blocks([_Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = _QueryPooler(embed_dim, pooler_heads, pooler_queries)
        self.attn_pool_contrastive = _QueryPooler(embed_dim, pooler_heads, 1)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))

    def _alibi(self, cells: torch.Tensor, dtype: torch.dtype) -> Any:
        """bias_rows(s, e) for token rows s..e-1 (token 0 the class token, unbiased): -slope * distance. The
        reference takes the distance in float64 and rounds it to float32; torch's direct (not matmul) cdist in
        float32 on the CPU gives those very numbers (every offset below 2000 cells is checked in the tests) in
        half the time, and float64 is used elsewhere."""
        neg_slopes = -torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32,
                                   device=cells.device).view(-1, 1, 1)
        points = cells.to(torch.float32 if cells.device.type == "cpu" else torch.float64)

        def bias_rows(start: int, end: int) -> torch.Tensor:
            bias = torch.empty(self.num_heads, end - start, len(points) + 1, dtype=torch.float32, device=cells.device)
            bias[:, :, 0] = 0
            if start == 0:
                bias[:, 0] = 0
            first = max(start, 1)
            if end > first:
                dist = torch.cdist(points[first - 1:end - 1], points, compute_mode="donot_use_mm_for_euclid_dist")
                torch.mul(dist.to(torch.float32).unsqueeze(0), neg_slopes, out=bias[:, first - start:, 1:])
            return bias.to(dtype)

        return bias_rows

    def forward(self, tiles: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(N, 768) tissue tiles and their (N, 2) integer grid cells → the (768,) slide embedding."""
        x = self.patch_embed(tiles).unsqueeze(0)
        x = torch.cat([self.cls_token.to(x.dtype), x], dim=1)
        bias_rows = self._alibi(cells, x.dtype)
        for block in self.blocks.modules_list:
            x = block(x, bias_rows)
        return self.attn_pool_contrastive(self.norm(x))[0, 0]

    def embed(self, tiles: torch.Tensor, coords: torch.Tensor, spacing: float) -> torch.Tensor:
        """One slide: (N, 768) CONCH v1.5 features and level-0 (x, y) corners → (768,)."""
        tissue = tiles.ne(0).any(dim=1)  # the reference's background rule: an all-zero feature row
        if not bool(tissue.any()):
            raise EncoderError("TITAN: every tile's features are all zero, which TITAN reads as background")
        cells = grid_cells(coords[tissue], spacing, "TITAN")
        width = int(cells[:, 1].max()) + 1
        order = torch.argsort(cells[:, 0] * width + cells[:, 1])  # the reference's raster order (x-major)
        return self(tiles[tissue][order], cells[order])
