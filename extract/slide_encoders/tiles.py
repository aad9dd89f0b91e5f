"""The tiles a slide encoder reads, checked once for every architecture: features (N, D) and level-0 (x, y)
corners (N, 2) of one slide, and the level-0 distance between neighbouring tiles (the tile side at level 0 when
tiles do not overlap: 512 px for a 512 px tile at 0.5 µm/px on a 0.5 µm/px scan, 1024 on a 0.25 µm/px one)."""

from __future__ import annotations

import math

import numpy as np
import torch

from slidecache.errors import EncoderError


def as_tiles(features: torch.Tensor | np.ndarray, coords: torch.Tensor | np.ndarray, spacing: float, dim: int,
             model: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Features as the model's dtype on its device, corners as float64 there: or an EncoderError that says
    what is wrong (width, shape, NaN, an empty slide, a spacing that is not a positive number)."""
    feats = torch.as_tensor(features)
    xy = torch.as_tensor(coords)
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise EncoderError(f"{model} reads ({dim})-wide tile features (N, {dim}) of one slide, got shape "
                           f"{tuple(feats.shape)}")
    if xy.shape != (feats.shape[0], 2):
        raise EncoderError(f"{model}: coordinates must be (N, 2) level-0 x, y, one row per tile; got "
                           f"{tuple(xy.shape)} for {feats.shape[0]} tiles")
    if feats.shape[0] == 0:
        raise EncoderError(f"{model}: the slide has no tiles")
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise EncoderError(f"{model}: the level-0 tile spacing must be a positive number, got {spacing!r}")
    feats = feats.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(feats).all()):
        raise EncoderError(f"{model}: the tile features hold NaN or infinite values")
    return feats, xy.to(device=device, dtype=torch.float64)


def grid_cells(coords: torch.Tensor, spacing: float, model: str, relative: bool = True) -> torch.Tensor:
    """(N, 2) level-0 corners → (N, 2) int64 grid cells (column, row) = round(xy / spacing), counted from the
    slide's first tile when `relative`. Rounded, not floored: a spacing that is not a whole number of pixels
    gives corners stored rounded down, which floor would put one cell back. Two tiles in one cell are refused."""
    origin = coords.min(dim=0).values if relative else torch.zeros(2, dtype=coords.dtype, device=coords.device)
    cells = torch.round((coords - origin) / spacing).to(torch.int64)
    if bool((cells < 0).any()):
        raise EncoderError(f"{model}: negative level-0 coordinates")
    width = int(cells[:, 1].max()) + 1
    flat = cells[:, 0] * width + cells[:, 1]
    if len(torch.unique(flat)) != len(flat):
        raise EncoderError(f"{model} places each tile in a grid cell of the tile spacing ({spacing:g} px at level "
                           "0) and two tiles fell in one cell: the tiles overlap (a stride below the tile size) or "
                           "the spacing is not the tiles' level-0 distance")
    return cells
