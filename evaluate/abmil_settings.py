"""The ABMIL heads' training settings, apart from the model: a module that needs no torch, so the pooled-feature
heads' fold workers (joblib processes that import evaluate.survival) start without importing it (2.4 s each)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-4
    hidden: int = 128
    dropout: float = 0.25
    ties: str = "efron"
    bins: int = 4
    device: str = "auto"  # auto: CUDA when visible
