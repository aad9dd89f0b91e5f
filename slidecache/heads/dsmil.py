"""DSMIL (Li, Li & Eliceiri 2021, CVPR; binli123/dsmil-wsi `MILNet`): an instance classifier scores every tile;
per output, the top-scoring tile is the critical instance; every tile is attended by the similarity of its query
to the critical instance's (softmax over the bag, scaled by √dim), and a bag classifier (DSMIL's Conv1d over the
attended bag vectors) scores the bag. The output is the mean of the max-instance score and the bag score
(DSMIL's `--average`, here on logits), trained as DSMIL does: half the loss on each."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slidecache.heads.mil import BagLoss, MILNetwork, masked_softmax


class DSMIL(MILNetwork):
    """tile → hidden (Linear-ReLU-Dropout; DSMIL reads the features directly) → instance scores and queries
    (DSMIL's non-linear q: Linear-ReLU-Linear-Tanh; v is the identity)."""

    architecture = "dsmil"

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25, **options: Any) -> None:
        super().__init__(dim, n_out, hidden, dropout, **options)
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.instance = nn.Linear(hidden, n_out)
        self.query = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Conv1d(n_out, n_out, kernel_size=hidden)  # one linear map of the n_out bag vectors

    def _parts(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(max-instance scores (B, C), bag scores (B, C), attention (B, N, C))."""
        h = self.embed(x)
        scores = self.instance(h).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        top, critical = scores.max(dim=1)  # (B, C): per output, its critical tile
        q = self.query(h)
        q_critical = q.gather(1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, C, Q)
        similarity = q @ q_critical.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, N, C)
        attention = masked_softmax(similarity, mask.unsqueeze(-1))
        bag = self.head(attention.transpose(1, 2) @ h).squeeze(-1)  # (B, C, H) → (B, C)
        return top, bag, attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, bag, attention = self._parts(x, mask)
        return (top + bag) / 2, attention.mean(-1)

    def objective(self, x: torch.Tensor, mask: torch.Tensor, bag_loss: BagLoss,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
        top, bag, _ = self._parts(x, mask)
        return (bag_loss(bag) + bag_loss(top)) / 2

    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Both scores start at `bias`, so their mean does."""
        with torch.no_grad():
            self.instance.bias.copy_(bias)
            self.head.bias.copy_(bias)
