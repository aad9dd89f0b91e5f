"""CLAM-SB (Lu et al. 2021, Nat. Biomed. Eng.; mahmoodlab/CLAM `CLAM_SB`): gated attention with one branch, and
instance-level clustering: the k most and k least attended tiles of a bag are fed to an instance classifier of
the bag's class as positives and negatives, a smooth top-1 SVM (CLAM's `--inst_loss svm`) or cross-entropy
on them weighted 0.3 beside the bag loss (CLAM's `--bag_weight 0.7`, `--B 8`). Out-of-class negatives
(CLAM's `--subtyping`) are not used: grades are ordered, not subtypes. Survival has no class, so its heads
train on the bag loss alone."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slidecache.errors import EvaluationError
from slidecache.heads.mil import BagLoss, MILNetwork, masked_softmax

INSTANCE_LOSSES = ("svm", "ce")


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, tau: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Mean smooth top-1 SVM loss (Berrada et al. 2018, as topk.svm.SmoothTop1SVM that CLAM uses):
    tau * log Σ_j exp((s_j + alpha·[j != y] - s_y) / tau)."""
    margin = alpha * (1 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    return (tau * torch.logsumexp((logits + margin - logits.gather(1, target[:, None])) / tau, dim=1)).mean()


class CLAMSB(MILNetwork):
    """tile → hidden (Linear-ReLU-Dropout) → gated attention (with dropout, as CLAM's) → weighted mean → outputs;
    one 2-way instance classifier per output class."""

    architecture = "clam-sb"
    options = ("instance_loss", "instance_weight", "k_sample")
    separable = True

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25, instance_loss: str = "svm",
                 instance_weight: float = 0.3, k_sample: int = 8, **options: Any) -> None:
        if instance_loss not in INSTANCE_LOSSES:
            raise EvaluationError(f"CLAM's instance loss is one of {', '.join(INSTANCE_LOSSES)}, not {instance_loss!r}")
        super().__init__(dim, n_out, hidden, dropout, instance_loss=instance_loss, instance_weight=instance_weight,
                         k_sample=k_sample, **options)
        self.instance_loss, self.instance_weight, self.k_sample = instance_loss, instance_weight, k_sample
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_a = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden // 2, 1)
        self.head = nn.Linear(hidden, n_out)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_out))

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        logits = self.attention_logits(h)
        attention = masked_softmax(logits, mask)
        return self.head((attention.unsqueeze(-1) * h).sum(1)), attention, h

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, attention, _ = self._forward(x, mask)
        return outputs, attention

    def tile_scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_logits(self.embed(x))

    def clustering_loss(self, h: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
        """Mean over the bags of the instance loss on their top-k (positive) and bottom-k (negative) tiles; k is
        at most half a bag's tiles, so the two sets never share a tile (CLAM assumes bags larger than 2k)."""
        losses = []
        for b in range(len(h)):
            real = mask[b].nonzero().squeeze(1)
            k = min(self.k_sample, len(real) // 2)
            if k == 0:
                continue
            scores, tiles = attention[b, real], h[b, real]
            chosen = torch.cat([scores.topk(k).indices, (-scores).topk(k).indices])
            target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            logits = self.instance_classifiers[int(labels[b])](tiles[chosen])
            losses.append(smooth_top1_svm(logits, target) if self.instance_loss == "svm"
                          else F.cross_entropy(logits, target))
        return torch.stack(losses).mean() if losses else h.sum() * 0

    def objective(self, x: torch.Tensor, mask: torch.Tensor, bag_loss: BagLoss,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
        outputs, attention, h = self._forward(x, mask)
        loss = bag_loss(outputs)
        if labels is None:  # survival: no class to cluster the tiles of
            return loss
        clustering = self.clustering_loss(h, attention, mask, labels)
        return (1 - self.instance_weight) * loss + self.instance_weight * clustering
