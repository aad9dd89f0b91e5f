"""TransMIL (Shao et al. 2021, NeurIPS; szc19990412/TransMIL): tiles projected (Linear-ReLU), the sequence
filled up to a square with its first tiles again, a class token prepended, then the TPT module: a Nyström-attention
layer, the PPEG position encoding (depthwise 7x7 + 5x5 + 3x3 convolutions, plus identity, over the square grid
of tokens in bag order), a second Nyström layer, LayerNorm, and the class token → outputs.

Nyström attention (Xiong et al. 2021, as lucidrains/nystrom-attention that TransMIL imports): softmax(QKᵀ)V
≈ softmax(Q K̃ᵀ) pinv(softmax(Q̃ K̃ᵀ)) softmax(Q̃ Kᵀ) V, with the landmarks Q̃, K̃ the means of consecutive
segments of the sequence, the pseudo-inverse by 6 Newton-Schulz-type iterations, and a depthwise convolution of V
along the sequence added (kernel 33). A bag no longer than the landmarks (hidden / 2, as TransMIL's 256 of 512) is
attended exactly. Batched bags are exact here: each bag's landmarks are segments of its own tokens, each bag's
grid its own square (zeros around it are what a convolution pads with), and each pseudo-inverse starts from its
own matrix's norms, so padding never changes a bag's output. Not order invariant: the grid and the landmarks
follow the tiles' order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slidecache.heads.mil import MILNetwork

HEADS, PINV_ITERATIONS, RESIDUAL_KERNEL, ATTENTION_DROPOUT = 8, 6, 33, 0.1  # TransMIL's settings


def iterative_pinv(x: torch.Tensor, iterations: int = PINV_ITERATIONS) -> torch.Tensor:
    """Pseudo-inverse of each (…, m, m) matrix by the Nyströmformer's iteration (Razavi et al. 2014), started from
    that matrix's own largest row and column sums (the library's batch-wide start would let bags change each other)."""
    scale = x.abs().sum(-1).amax(-1) * x.abs().sum(-2).amax(-1)
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, landmarks: int, heads: int = HEADS, dropout: float = ATTENTION_DROPOUT) -> None:
        super().__init__()
        self.heads, self.landmarks, self.dim_head = heads, landmarks, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * heads * self.dim_head, bias=False)
        self.residual = nn.Conv2d(heads, heads, (RESIDUAL_KERNEL, 1), padding=(RESIDUAL_KERNEL // 2, 0), groups=heads,
                                  bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * self.dim_head, dim), nn.Dropout(dropout))

    def _landmarks(self, t: torch.Tensor, segment: torch.Tensor, count: torch.Tensor, m: int) -> torch.Tensor:
        """(B, h, m, d) mean of each segment's tokens; padded tokens sit in a spare segment m, dropped."""
        index = segment[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
        sums = t.new_zeros(t.shape[0], t.shape[1], m + 1, t.shape[-1]).scatter_add(2, index, t)[:, :, :m]
        return sums / count.clamp_min(1)[:, None, :, None]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, dim), mask (B, L) true on each bag's first `lengths` tokens → (out (B, L, dim), the first
        token's attention over the tokens (B, L), mean over heads)."""
        b, length, _ = x.shape
        q, k, v = (t.view(b, length, self.heads, self.dim_head).transpose(1, 2) * mask[:, None, :, None]
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.dim_head ** -0.5
        # A bag no longer than the landmarks would have one token per landmark, where Nyström is exact attention
        # (A pinv(A) A = A) but its iterated pseudo-inverse only approximates it: such bags are attended exactly.
        short = lengths <= self.landmarks
        if short.all():
            mixed, first = self._exact(q, k, v, mask)
        elif not short.any():
            mixed, first = self._nystrom(q, k, v, mask, lengths)
        else:  # each bag as it would be alone
            exact, nystrom = self._exact(q, k, v, mask), self._nystrom(q, k, v, mask, lengths)
            mixed = torch.where(short[:, None, None, None], exact[0], nystrom[0])
            first = torch.where(short[:, None], exact[1], nystrom[1])
        out = mixed + self.residual(v)
        return self.to_out(out.transpose(1, 2).reshape(b, length, -1)), first

    @staticmethod
    def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], float("-inf")), -1)
        return attention @ v, attention[:, :, 0].mean(1)

    def _nystrom(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, length, _ = q.shape
        m = self.landmarks
        position = torch.arange(length, device=q.device)
        segment = torch.where(mask, position[None] * m // lengths[:, None], m)
        count = torch.zeros(b, m + 1, dtype=q.dtype, device=q.device).scatter_add(1, segment, mask.to(q.dtype))[:, :m]
        q_land, k_land = self._landmarks(q, segment, count, m), self._landmarks(k, segment, count, m)
        has = (count > 0)[:, None, None, :]  # (B, 1, 1, m): a bag shorter than m has empty landmarks
        lowest = torch.finfo(q.dtype).min
        kernel1 = torch.softmax((q @ k_land.transpose(-1, -2)).masked_fill(~has, lowest), dim=-1)
        kernel2 = torch.softmax((q_land @ k_land.transpose(-1, -2)).masked_fill(~has, lowest), dim=-1)
        # An empty landmark's row is the identity's: the matrix is block diagonal, its inverse the real block's.
        kernel2 = torch.where(has.transpose(-1, -2), kernel2, torch.eye(m, dtype=q.dtype, device=q.device))
        kernel3 = torch.softmax((q_land @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], lowest), dim=-1)
        left = kernel1 @ iterative_pinv(kernel2)
        return left @ (kernel3 @ v), (left[:, :, :1] @ kernel3).squeeze(2).mean(1)


class TransLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, landmarks=dim // 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, first = self.attention(self.norm(x), mask, lengths)
        return x + out, first


class PPEG(nn.Module):
    """Pyramid position encoding generator: x + conv7(x) + conv5(x) + conv3(x) (depthwise) on each bag's grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def _merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x + the three convolutions as one 7x7 (the same map; depthwise convolutions are slow on CPUs)."""
        weight = sum(F.pad(conv.weight, [(7 - conv.kernel_size[0]) // 2] * 4) for conv in self.convs)
        weight = weight + F.pad(torch.ones_like(weight[:, :, :1, :1]), [3] * 4)
        return weight, sum(conv.bias for conv in self.convs)

    def forward(self, x: torch.Tensor, side: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (B, 1 + T, dim): class token then each bag's side² grid tokens row by row (`real` true on them)."""
        b, _, dim = x.shape
        grid_side = int(side.max())
        t = torch.arange(real.shape[1], device=x.device)
        cell = torch.where(real, (t[None] // side[:, None]) * grid_side + t[None] % side[:, None], grid_side ** 2)
        index = cell.unsqueeze(-1).expand(-1, -1, dim)
        tokens = x[:, 1:] * real.unsqueeze(-1)
        grid = x.new_zeros(b, grid_side ** 2 + 1, dim).scatter_add(1, index, tokens)[:, :-1]
        grid = grid.transpose(1, 2).reshape(b, dim, grid_side, grid_side)  # zero outside each bag's square
        grid = F.conv2d(grid, *self._merged(), padding=3, groups=dim)
        flat = grid.flatten(2).transpose(1, 2)
        back = flat.gather(1, index.clamp_max(grid_side ** 2 - 1)) * real.unsqueeze(-1)
        return torch.cat([x[:, :1], back], dim=1)


class TransMIL(MILNetwork):
    """tile → hidden (Linear-ReLU-Dropout) → square fill → [class token] → Nyström layer → PPEG → Nyström layer →
    LayerNorm → class token → outputs; attention: the class token's over the tiles in the last layer."""

    architecture = "transmil"

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25, **options: Any) -> None:
        super().__init__(dim, n_out, hidden, dropout, **options)
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.layer1, self.layer2 = TransLayer(hidden), TransLayer(hidden)
        self.ppeg = PPEG(hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        n = mask.sum(1)
        side = torch.tensor([math.isqrt(int(v) - 1) + 1 for v in n.tolist()], device=x.device)  # ceil(√n), exact
        cells = side * side
        t = torch.arange(int(cells.max()), device=x.device)
        real = t[None] < cells[:, None]
        # The t-th token is the (t mod n)-th real tile: the square filled with the bag's first tiles again.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        tile = order.gather(1, torch.where(real, t[None] % n[:, None], 0))
        tokens = h.gather(1, tile.unsqueeze(-1).expand(-1, -1, h.shape[-1])) * real.unsqueeze(-1)
        seq = torch.cat([self.cls_token.expand(len(h), -1, -1), tokens], dim=1)
        seq_mask = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)
        lengths = cells + 1
        seq, _ = self.layer1(seq, seq_mask, lengths)
        seq = self.ppeg(seq, side, real)
        seq, first = self.layer2(seq, seq_mask, lengths)
        outputs = self.head(self.norm(seq[:, 0]))
        # A tile that fills the square twice gets both its tokens' attention.
        attention = torch.zeros_like(mask, dtype=first.dtype).scatter_add(1, tile, first[:, 1:] * real)
        return outputs, attention
