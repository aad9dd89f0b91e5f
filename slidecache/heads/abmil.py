"""The gated attention-MIL network (Ilse et al. 2018; as in CLAM/TRIDENT) and a fitted model around it: what
`evaluate` fits (evaluate/abmil.py) and what a saved head applies to a new slide. Arrays in, arrays out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from slidecache.errors import EvaluationError


class GatedABMIL(nn.Module):
    """tile → hidden (Linear-ReLU-Dropout) → gated attention → weighted mean → `n_out` outputs."""

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
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
        attention = torch.softmax(self.attention_logits(h).masked_fill(~mask, float("-inf")), dim=1)
        return self.head((attention.unsqueeze(-1) * h).sum(1)), attention


def pad_bags(bags: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) standardised padded bags and the (B, N) mask; torch's in-place ops use every core
    (numpy's single-threaded version took as long as the training step itself)."""
    longest = max(len(b) for b in bags)
    x = torch.zeros((len(bags), longest, bags[0].shape[1]), dtype=torch.float32)
    mask = torch.zeros((len(bags), longest), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = torch.from_numpy(b)
        mask[i, : len(b)] = True
    x.sub_(torch.from_numpy(mean)).div_(torch.from_numpy(std))
    return x, mask


@dataclass
class ABMILModel:
    """A trained network with the training fold's input statistics and whatever its loss needs to predict."""

    network: GatedABMIL
    loss: str
    mean: np.ndarray
    std: np.ndarray
    bin_edges: np.ndarray | None = None  # nll: inner edges, then the longest training time
    history: list[float] = field(default_factory=list)
    describe: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def outputs(self, bags: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        self.network.eval()
        device = next(self.network.parameters()).device
        chunks = [self.network(*(t.to(device) for t in pad_bags(bags[i: i + batch_size], self.mean, self.std)))[0]
                  .float().cpu().numpy() for i in range(0, len(bags), batch_size)]
        return np.concatenate(chunks).astype(np.float64)

    def risk(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        out = self.outputs(bags)
        if self.loss == "cox":
            return out[:, 0]
        if self.loss == "nll":  # expected survival over the bins, negated: higher = worse (as PORPOISE)
            return -np.cumprod(1 - 1 / (1 + np.exp(-out)), axis=1).sum(1)
        raise EvaluationError(f"a {self.loss} head predicts classes, not risk")

    def bin_survival(self, bags: Sequence[np.ndarray], times: np.ndarray) -> np.ndarray:
        """nll heads: S at the end of bin k is Π_{j<=k} (1 - h_j); between bin ends it is interpolated
        linearly in time (events spread evenly within a bin), the last bin ending at the longest training time."""
        assert self.bin_edges is not None
        survival = np.cumprod(1 - 1 / (1 + np.exp(-self.outputs(bags))), axis=1)
        knots = np.concatenate([[0.0], self.bin_edges])
        return np.stack([np.interp(times, knots, np.concatenate([[1.0], s])) for s in survival])

    def probabilities(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        out = self.outputs(bags)
        out = np.exp(out - out.max(axis=1, keepdims=True))
        return out / out.sum(axis=1, keepdims=True)

    @torch.no_grad()
    def tile_attention(self, tiles: np.ndarray, block: int = 4096) -> np.ndarray:
        """Unnormalised attention score of every tile of a slide (softmax is a monotone rescaling)."""
        self.network.eval()
        device = next(self.network.parameters()).device
        scores = []
        for start in range(0, len(tiles), block):
            x = torch.from_numpy(((tiles[start: start + block].astype(np.float32) - self.mean) / self.std).astype(np.float32))
            scores.append(self.network.attention_logits(self.network.embed(x.to(device))).cpu().numpy())
        return np.concatenate(scores)
