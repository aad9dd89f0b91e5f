"""Prov-GigaPath's slide encoder (Xu et al. 2024, prov-gigapath/prov-gigapath, "gigapath_slide_enc12l768d"): a
linear embedding of each GigaPath tile feature (1536 → 768) plus a fixed 2-D sine-cosine embedding of the tile's
cell on a 1000 x 1000 grid, then 12 LongNet layers (pre-norm, sub-LayerNorms, dilated attention: 16 heads, five
segment lengths with dilation 1, 2, 4, 8, 16, mixed by their log-sum-exp).

Written from the public code, github.com/prov-gigapath/prov-gigapath at commit 09d8e876afb9: gigapath/
slide_encoder.py (LongNetViT, create_model), gigapath/pos_embed.py and gigapath/torchscale/ (architecture/
encoder.py, component/dilated_attention.py, multihead_attention.py, feedforward_network.py, model/LongNet.py and
LongNetConfig.py). Parameter names and shapes are LongNetViT's state dict; the published file
(slide_encoder.pth) holds it under "model".

The slide embedding is TRIDENT's (mahmoodlab/TRIDENT, trident/slide_encoder_models/load.py) and the GigaPath
fine-tuning default (feat_layer 11, global_pool): the mean of the tile tokens after layer 11 of 12, layer-normed.
The class token is not used: the authors note it was not trained.

Faithful to the reference where it is unusual, because the weights were trained with it:
- positions are absolute cells floor(xy / spacing) (rounded here: the same on a tile grid, see tiles.py); a slide
  past the 1000-cell grid is refused (the reference would index past it or wrap a row);
- LongNet is not order-invariant (a segment is a run of the sequence), and the reference takes the tiles in the
  order given: we put them in row-major order of their cells (y, then x: TRIDENT's patching order), so the
  embedding does not depend on the order a store lists them in;
- keys and values are padded with zeros after their projections and the reference's flash attention gets no
  padding mask, so padded slots take part in the softmax (score 0, value 0); a log-sum-exp of exactly 0 counts
  as "not covered". We reproduce both, and the way segments padded for a dilation are concatenated (it shifts
  positions only past 185,363 tiles)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extract.slide_encoders.attention import attention_with_lse
from extract.slide_encoders.tiles import grid_cells
from slidecache.errors import EncoderError

# gigapath_slide_enc12l768d with LongNet_12_layers_768_dim; the segment lengths are LongNetViT's
# get_optimal_segment_length(max_wsi_size=262144, tile_size=256): 2 ** linspace(10, 20, 5), truncated.
GIGAPATH_SLIDE_ARCH: dict[str, Any] = dict(
    tile_dim=1536, embed_dim=768, depth=12, num_heads=16, ffn_dim=3072, slide_ngrids=1000,
    segment_length=(1024, 5792, 32768, 185363, 1048576), dilated_ratio=(1, 2, 4, 8, 16), output_layer=11,
)
_NOT_COVERED = -1e8  # the reference's log-sum-exp for a position a head does not see in a segment pattern


def sincos_2d(cells: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, 2) cells (column x, row y) → (N, dim) float32: MAE's 2-D sine-cosine table read at cell x * G + y,
    whose first half encodes y and second half x, computed in float64 as numpy does."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=cells.device) / (dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cells[:, 1]), one_axis(cells[:, 0])], dim=1).to(torch.float32)


def _sparse(x: torch.Tensor, segment: int, ratio: int) -> tuple[torch.Tensor, int, int]:
    """(L, H, d) → (n * H, m, d): segments of `segment` positions (zero-padded), each head group r of H / ratio
    heads keeping positions r, r + ratio, ... of its segment."""
    length, heads, d = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, (-length) % segment))
    n = x.shape[0] // segment
    x = F.pad(x.view(n, segment, heads, d), (0, 0, 0, 0, 0, (-segment) % ratio))
    m = x.shape[1] // ratio
    x = torch.diagonal(x.view(n, m, ratio, ratio, heads // ratio, d), dim1=2, dim2=3)  # (n, m, H/r, d, r)
    return x.permute(0, 4, 2, 1, 3).reshape(n * heads, m, d), n, m


def _dense(out: torch.Tensor, lse: torch.Tensor, n: int, m: int, ratio: int,
           length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of _sparse: (n * H, m, d) outputs and (n * H, m) log-sum-exps → (L, H, d), (L, H); a position
    a head does not cover gets log-sum-exp -1e8, so it weighs nothing when the branches are mixed."""
    heads, d = out.shape[0] // n, out.shape[-1]
    dense = out.new_zeros(n, m, ratio, ratio, heads // ratio, d)
    dense_lse = lse.new_full((n, m, ratio, ratio, heads // ratio), _NOT_COVERED)
    torch.diagonal(dense, dim1=2, dim2=3).copy_(out.view(n, ratio, heads // ratio, m, d).permute(0, 3, 2, 4, 1))
    torch.diagonal(dense_lse, dim1=2, dim2=3).copy_(lse.view(n, ratio, heads // ratio, m).permute(0, 3, 2, 1))
    dense_lse = dense_lse.masked_fill(dense_lse == 0, _NOT_COVERED)  # as the reference's masked_fill(lse == 0)
    return dense.reshape(n * m * ratio, heads, d)[:length], dense_lse.reshape(n * m * ratio, heads)[:length]


class _DilatedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, segment_length: tuple[int, ...], dilated_ratio: tuple[int, ...]) -> None:
        super().__init__()
        if any(heads % r for r in dilated_ratio):
            raise EncoderError(f"LongNet: {heads} heads do not split into groups for dilations {dilated_ratio}")
        self.heads, self.segment_length, self.dilated_ratio = heads, segment_length, dilated_ratio
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(L, dim) one slide's tokens → (L, dim). Attention in float32 whatever the weights' dtype: the branches
        are mixed by their log-sum-exp, which bf16 would blur."""
        length, dim = x.shape
        q, k, v = (proj(x).float().view(length, self.heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        outs, lses = [], []
        for segment, ratio in zip(self.segment_length, self.dilated_ratio):
            segment = min(segment, length)
            (qs, n, m), (ks, _, _), (vs, _, _) = (_sparse(t, segment, ratio) for t in (q, k, v))
            out, lse = _dense(*attention_with_lse(qs, ks, vs), n, m, ratio, length)
            outs.append(out)
            lses.append(lse)
        weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)  # (branches, L, H, 1)
        mixed = (torch.stack(outs) * weights).sum(0).reshape(length, dim).to(x.dtype)
        return self.out_proj(self.inner_attn_ln(mixed))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        return self.fc2(self.ffn_layernorm(F.gelu(hidden.float()).to(hidden.dtype)))


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, segment_length: tuple[int, ...],
                 dilated_ratio: tuple[int, ...]) -> None:
        super().__init__()
        self.self_attn = _DilatedAttention(dim, heads, segment_length, dilated_ratio)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.ffn = _FeedForward(dim, ffn_dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class _Encoder(nn.Module):
    """`encoder.*`: the layers and the final norm (published, but not on the path to the slide embedding)."""

    def __init__(self, depth: int, dim: int, **layer: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, **layer) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim)


class _PatchEmbed(nn.Module):
    def __init__(self, tile_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(tile_dim, dim)


class GigaPathSlideEncoder(nn.Module):
    def __init__(self, tile_dim: int, embed_dim: int, depth: int, num_heads: int, ffn_dim: int, slide_ngrids: int,
                 segment_length: tuple[int, ...], dilated_ratio: tuple[int, ...], output_layer: int) -> None:
        super().__init__()
        if not 0 < output_layer <= depth:
            raise EncoderError(f"GigaPath: output_layer must be 1..{depth}, got {output_layer}")
        self.embedding_dim, self.slide_ngrids, self.output_layer = embed_dim, slide_ngrids, output_layer
        self.patch_embed = _PatchEmbed(tile_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder = _Encoder(depth, embed_dim, heads=num_heads, ffn_dim=ffn_dim,
                                segment_length=tuple(segment_length), dilated_ratio=tuple(dilated_ratio))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, tiles: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(N, 1536) tiles in sequence order and their (N, 2) absolute cells → the (768,) slide embedding."""
        x = self.patch_embed.proj(tiles) + sincos_2d(cells, self.embedding_dim).to(tiles.dtype)
        x = torch.cat([self.cls_token[0].to(x.dtype), x])  # the class token's position embedding is zero
        for layer in self.encoder.layers[: self.output_layer]:
            x = layer(x)
        return self.norm(x[1:].mean(dim=0))

    def embed(self, tiles: torch.Tensor, coords: torch.Tensor, spacing: float) -> torch.Tensor:
        """One slide: (N, 1536) GigaPath tile features and level-0 (x, y) corners → (768,)."""
        cells = grid_cells(coords, spacing, "Prov-GigaPath", relative=False)
        if int(cells.max()) >= self.slide_ngrids:
            raise EncoderError(f"Prov-GigaPath places tiles on a {self.slide_ngrids} x {self.slide_ngrids} grid of "
                               f"cells and this slide reaches cell {int(cells.max())} ({spacing:g} px at level 0 "
                               "per cell): larger than the model can place")
        order = torch.argsort(cells[:, 1] * self.slide_ngrids + cells[:, 0])  # row-major: y, then x
        return self(tiles[order], cells[order])
