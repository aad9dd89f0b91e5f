"""Cached patch-token grids → InternVL's visual tokens: pixel shuffle with ratio 0.5 folds each 2x2
neighbourhood of patch tokens into one token of 4x the width, so a 16x16x1280 grid becomes 64 tokens of
5120 (then mlp1: LayerNorm(5120) → Linear(5120, H) → GELU → Linear(H, H)). Same reshapes as InternVL's
`pixel_shuffle` (ps_version v2) after `extract_feature` drops the prefix tokens, so mlp1 weights carry over.
"""

from __future__ import annotations

import math

import torch

DOWNSAMPLE_RATIO = 0.5


def pixel_shuffle(x: torch.Tensor, scale_factor: float = DOWNSAMPLE_RATIO) -> torch.Tensor:
    """(N, W, H, C) → (N, W·s, H·s, C/s²), InternVL's order of views and permutes."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def grid_to_visual_tokens(tokens: torch.Tensor, scale_factor: float = DOWNSAMPLE_RATIO) -> torch.Tensor:
    """(tiles, T, C) patch tokens in row-major grid order → (tiles · T·s², C/s²) visual tokens, tile by tile."""
    n, t, c = tokens.shape
    side = math.isqrt(t)
    if side * side != t or side * scale_factor != int(side * scale_factor):
        raise ValueError(f"a {t}-token grid is not square with a side divisible by {1 / scale_factor:g}")
    shuffled = pixel_shuffle(tokens.reshape(n, side, side, c), scale_factor)
    return shuffled.reshape(-1, shuffled.shape[-1])


def tokens_per_tile(grid_tokens: int, scale_factor: float = DOWNSAMPLE_RATIO) -> int:
    return int(grid_tokens * scale_factor * scale_factor)
