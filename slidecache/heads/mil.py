"""What every attention-MIL network shares (the contract of slidecache/heads/networks.py's registry), and a
fitted model around any of them: what `evaluate` fits (evaluate/abmil.py) and a saved head applies to a new
slide. Arrays in, arrays out.

The contract: `forward(x (B, N, D) padded bags, mask (B, N) true on real tiles) -> (outputs (B, n_out),
attention (B, N))`; a padded tile never changes an output. Training asks the network for its `objective`
(the bag loss on its outputs, plus whatever its paper adds: CLAM's instance clustering, DSMIL's max-instance
loss), and the heatmap for `tile_scores` of one slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from slidecache.errors import EvaluationError

BagLoss = Callable[[torch.Tensor], torch.Tensor]


class MILNetwork(nn.Module):
    """Base of the networks: records its constructor arguments (what a saved head rebuilds it from)."""

    architecture: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()  # training settings (evaluate's TrainSettings fields) it takes
    separable: ClassVar[bool] = False  # a tile's score depends on that tile alone: heatmaps go block by block

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25, **options: Any) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"dim": dim, "n_out": n_out, "hidden": hidden, "dropout": dropout, **options}

    def objective(self, x: torch.Tensor, mask: torch.Tensor, bag_loss: BagLoss,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of a batch: `bag_loss` of the outputs; `labels` (classes) for instance losses."""
        return bag_loss(self(x, mask)[0])

    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Start the outputs at `bias` (the nll heads' life-table hazards)."""
        with torch.no_grad():
            self.head.bias.copy_(bias)

    def tile_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) one slide's standardised tiles → (N,) a score per tile; only its ranks are drawn."""
        return self(x.unsqueeze(0), torch.ones(1, len(x), dtype=torch.bool, device=x.device))[1][0]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax over real tiles only: a padded tile gets exactly 0."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


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
class MILModel:
    """A trained network with the training fold's input statistics and whatever its loss needs to predict."""

    network: MILNetwork
    loss: str
    mean: np.ndarray
    std: np.ndarray
    bin_edges: np.ndarray | None = None  # nll: inner edges, then the longest training time
    history: list[float] = field(default_factory=list)
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.network.architecture

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

    def _standardised(self, tiles: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((tiles.astype(np.float32) - self.mean) / self.std).astype(np.float32))

    @torch.no_grad()
    def tile_attention(self, tiles: np.ndarray, block: int = 4096) -> np.ndarray:
        """A score of every tile of a slide (its attention, up to a monotone rescaling). A separable network
        scores blocks of tiles; the others (TransMIL, DSMIL) need the whole slide in one bag."""
        self.network.eval()
        device = next(self.network.parameters()).device
        if not self.network.separable:
            return self.network.tile_scores(self._standardised(tiles).to(device)).float().cpu().numpy()
        return np.concatenate([self.network.tile_scores(self._standardised(tiles[start: start + block]).to(device))
                               .float().cpu().numpy() for start in range(0, len(tiles), block)])
