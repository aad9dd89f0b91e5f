"""The attention-MIL heads' training settings, apart from the model: a module that needs no torch, so the
pooled-feature heads' fold workers (joblib processes that import evaluate.survival) start without importing it
(2.4 s each)."""

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
    # CLAM-SB's instance clustering (grade only), CLAM's defaults: smooth top-1 SVM, weight 1 - bag_weight 0.7, B 8
    instance_loss: str = "svm"
    instance_weight: float = 0.3
    k_sample: int = 8
