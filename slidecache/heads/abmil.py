"""The gated attention-MIL network (Ilse et al. 2018; as in CLAM/TRIDENT). The fitted model around it and the
padding are every MIL network's (slidecache/heads/mil.py); their old names here keep working."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slidecache.heads.mil import MILModel, MILNetwork, masked_softmax, pad_bags

ABMILModel = MILModel  # the name saved heads, heatmaps and train.slide_report import
__all__ = ["ABMILModel", "GatedABMIL", "MILModel", "pad_bags"]


class GatedABMIL(MILNetwork):
    """tile → hidden (Linear-ReLU-Dropout) → gated attention → weighted mean → `n_out` outputs."""

    architecture = "abmil"
    separable = True

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25, **options: Any) -> None:
        super().__init__(dim, n_out, hidden, dropout, **options)
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, hidden // 2)
        self.attention_u = nn.Linear(hidden, hidden // 2)
        self.attention_w = nn.Linear(hidden // 2, 1)
        self.head = nn.Linear(hidden, n_out)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) padded bags, mask (B, N) true on real tiles → (outputs (B, n_out), attention (B, N))."""
        h = self.embed(x)
        attention = masked_softmax(self.attention_logits(h), mask)
        return self.head((attention.unsqueeze(-1) * h).sum(1)), attention

    def tile_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention (softmax is a monotone rescaling): each tile's alone, so blocks can be scored."""
        return self.attention_logits(self.embed(x))
