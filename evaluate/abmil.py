"""Attention-MIL heads trained on the cached tiles: gated attention (ABMIL, Ilse et al. 2018; as in CLAM/TRIDENT),
TransMIL, CLAM-SB and DSMIL (slidecache/heads/networks.py), all through one training loop.

A patient is one bag: up to `max_tiles` tiles sampled from all of the patient's slides, read from the
store once per cross-validation. Three losses serve every network:
  * `cox`  — negative Cox partial log-likelihood over the mini-batch, Efron or Breslow ties;
  * `nll`  — discrete-time survival NLL (Zadeh & Schmid 2020, as PORPOISE/SurvPath) over quantile bins
             of the uncensored training times;
  * `ce`   — cross-entropy for grade classification.
The network adds to the loss what its paper does (CLAM-SB: instance clustering on grade; DSMIL: half the loss on
its max-instance score). Inputs are standardised with the training fold's tile statistics; everything is seeded.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from evaluate.abmil_settings import TrainSettings
from slidecache.devices import pick_device
from slidecache.errors import EvaluationError
from slidecache.heads.mil import BagLoss, MILModel, pad_bags
from slidecache.heads.networks import build_network
from store.embedding_store import EmbeddingStore

DEFAULT_MAX_TILES = 512


def load_bags(store: EmbeddingStore, slides: Sequence[Sequence[str]], max_tiles: int = DEFAULT_MAX_TILES,
              seed: int = 0) -> np.ndarray:
    """One float32 bag per patient (object array, so fold masks index it): up to `max_tiles` tiles drawn
    without replacement from all of the patient's slides; the draw depends only on the seed and patient."""
    bags = np.empty(len(slides), dtype=object)
    for i, slide_ids in enumerate(slides):
        views = [store.slide(s) for s in slide_ids]
        counts = np.array([v.n_tiles for v in views])
        total = int(counts.sum())
        rng = np.random.default_rng([seed, i])
        chosen = np.sort(rng.choice(total, size=min(max_tiles, total), replace=False))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        parts = [v.embeddings(chosen[(chosen >= lo) & (chosen < hi)] - lo)
                 for v, lo, hi in zip(views, offsets[:-1], offsets[1:]) if ((chosen >= lo) & (chosen < hi)).any()]
        bags[i] = np.concatenate(parts).astype(np.float32)
    return bags


def cox_partial_nll(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, ties: str = "efron") -> torch.Tensor:
    """Negative Cox partial log-likelihood (sum over events) of linear predictors `risk`.

    Efron: each tied event time with d deaths contributes Σ_l log(R - l/d · D), l = 0..d-1 (R: risk-set sum
    of exp(risk), D: sum over the d deaths); Breslow: d · log R. Risks are shifted by their maximum
    first: the shift cancels exactly and keeps exp() finite.
    """
    if ties not in ("efron", "breslow"):
        raise EvaluationError(f"ties must be efron or breslow, got {ties!r}")
    event = event.to(risk.dtype)
    shifted = risk - risk.max().detach()
    hazard = torch.exp(shifted)
    unique, group = torch.unique(time, sorted=True, return_inverse=True)
    zeros = torch.zeros(len(unique), dtype=risk.dtype, device=risk.device)
    at_time = zeros.index_add(0, group, hazard)
    risk_set = torch.flip(torch.cumsum(torch.flip(at_time, [0]), 0), [0])  # Σ exp over time >= t
    deaths = zeros.index_add(0, group, event)
    died = deaths > 0
    if not died.any():
        return (risk * 0).sum()  # no event: no information (callers skip such batches)
    r, d = risk_set[died], deaths[died]
    if ties == "breslow":
        log_terms = d * torch.log(r)
    else:
        death_hazard = zeros.index_add(0, group, hazard * event)[died]
        steps = torch.arange(int(d.max().item()), dtype=risk.dtype, device=risk.device)
        fraction = steps.unsqueeze(0) / d.unsqueeze(1)
        used = steps.unsqueeze(0) < d.unsqueeze(1)
        inner = torch.where(used, r.unsqueeze(1) - fraction * death_hazard.unsqueeze(1), torch.ones_like(fraction))
        log_terms = torch.log(inner).sum(1)
    return log_terms.sum() - (shifted * event).sum()


def quantile_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges at quantiles of the uncensored times (the outer edges are 0 and +inf)."""
    uncensored = times[events.astype(bool)]
    if len(uncensored) < n_bins:
        raise EvaluationError(f"{len(uncensored)} events cannot define {n_bins} time bins")
    return np.unique(np.quantile(uncensored, np.linspace(0, 1, n_bins + 1)[1:-1]))


def discrete_time_nll(logits: torch.Tensor, label: torch.Tensor, event: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Sum over patients of -log P(observed): for an event in bin k, S(k-1)·h(k); censored in bin k, S(k)."""
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1 - hazards, dim=1)
    padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)  # S(-1) = 1
    label = label.long().unsqueeze(1)
    event = event.to(logits.dtype)
    s_before = padded.gather(1, label).squeeze(1)
    h_at = hazards.gather(1, label).squeeze(1)
    s_at = padded.gather(1, label + 1).squeeze(1)
    return -(event * torch.log((s_before * h_at).clamp_min(eps)) + (1 - event) * torch.log(s_at.clamp_min(eps))).sum()


def _tile_statistics(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every tile of the training bags, without stacking them (GBs)."""
    total = np.zeros(bags[0].shape[1])
    squares = np.zeros(bags[0].shape[1])
    count = 0
    for bag in bags:
        b = bag.astype(np.float64)
        total += b.sum(0)
        squares += (b * b).sum(0)
        count += len(b)
    mean = total / count
    return mean.astype(np.float32), (np.sqrt(np.maximum(squares / count - mean**2, 0)) + 1e-6).astype(np.float32)


def _life_table_logits(bin_label: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """logit of events in bin k / patients still at risk at bin k's start."""
    at_risk = np.array([(bin_label >= k).sum() for k in range(n_bins)], dtype=np.float64)
    deaths = np.bincount(bin_label[event.astype(bool)], minlength=n_bins).astype(np.float64)
    hazard = np.clip(deaths / np.maximum(at_risk, 1), 1e-3, 1 - 1e-3)
    return np.log(hazard / (1 - hazard)).astype(np.float32)


class _BagBatches:
    """Padded, standardised batches of bags on the training device. On a GPU every training bag is
    standardised and moved once (a fold's 512-tile bags are a few GB); on the CPU batches are padded as
    they are drawn, so the bags are not held twice in host memory."""

    def __init__(self, bags: Sequence[np.ndarray], mean: np.ndarray, std: np.ndarray, device: torch.device) -> None:
        self.bags, self.mean, self.std, self.device = bags, mean, std, device
        self.staged: list[torch.Tensor] | None = None
        if device.type != "cpu":
            m, s = torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)
            self.staged = [(torch.from_numpy(b).to(device).float() - m) / s for b in bags]

    def __call__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.staged is None:
            return pad_bags([self.bags[i] for i in idx], self.mean, self.std)
        chosen = [self.staged[i] for i in idx]
        x = nn.utils.rnn.pad_sequence(chosen, batch_first=True)
        lengths = torch.tensor([len(c) for c in chosen], device=self.device)
        mask = torch.arange(x.shape[1], device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
        return x, mask


def train_mil(bags: Sequence[np.ndarray], loss: str, seed: int, settings: TrainSettings | None = None, *,
              time: np.ndarray | None = None, event: np.ndarray | None = None,
              labels: np.ndarray | None = None, n_classes: int | None = None, architecture: str = "abmil") -> MILModel:
    """Fit one MIL network (`architecture`: abmil, transmil, clam-sb, dsmil). `loss`: cox/nll (need time and
    event) or ce (needs labels and n_classes)."""
    s = settings or TrainSettings()
    device = pick_device(s.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean, std = _tile_statistics(bags)
    edges = None
    if loss == "cox":
        assert time is not None and event is not None
        n_out = 1
    elif loss == "nll":
        assert time is not None and event is not None
        edges = quantile_bins(time, event, s.bins)
        bin_label = np.searchsorted(edges, time, side="right")
        n_out = len(edges) + 1
    elif loss == "ce":
        assert labels is not None and n_classes is not None
        n_out = n_classes
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        class_weight = torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32,
                                    device=device)
    else:
        raise EvaluationError(f"unknown MIL loss {loss!r}")
    network = build_network(architecture, bags[0].shape[1], n_out, **vars(s))  # hidden, dropout, CLAM's options
    if loss == "nll":  # start from the training fold's life-table hazards, so curves are calibrated from step 0
        network.set_output_bias(torch.from_numpy(_life_table_logits(bin_label, event, n_out)))
    network.to(device)
    batches = _BagBatches(bags, mean, std, device)
    on_device = lambda a: torch.from_numpy(a).to(device)  # noqa: E731

    def batch_loss(idx: np.ndarray) -> tuple[BagLoss, torch.Tensor | None]:
        """The batch's loss of a network's outputs, and its classes (which CLAM's instance loss needs)."""
        if loss == "cox":
            t, e, deaths = on_device(time[idx]), on_device(event[idx]), max(1, int(event[idx].sum()))
            return lambda out: cox_partial_nll(out[:, 0], t, e, s.ties) / deaths, None
        if loss == "nll":
            k, e = on_device(bin_label[idx]), on_device(event[idx])
            return lambda out: discrete_time_nll(out, k, e) / len(idx), None
        y = on_device(labels[idx]).long()
        return lambda out: nn.functional.cross_entropy(out, y, weight=class_weight), y

    optimiser = torch.optim.AdamW(network.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    history = []
    for _ in range(s.epochs):
        network.train()
        order = rng.permutation(len(bags))
        total, count = 0.0, 0
        for start in range(0, len(order), s.batch_size):
            idx = order[start: start + s.batch_size]
            if loss == "cox" and (len(idx) < 2 or not event[idx].any()):
                continue  # a batch without an event carries no partial likelihood
            value = network.objective(*batches(idx), *batch_loss(idx))
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            total += float(value.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
    if not all(math.isfinite(h) for h in history):
        raise EvaluationError(f"{architecture} training diverged (loss {history[-1]}); lower the learning rate")
    del batches  # frees the staged bags on the device
    describe = {"architecture": architecture, "loss": loss, "device": str(device), "epochs": s.epochs,
                "hidden": s.hidden, "lr": s.lr, "batch_size": s.batch_size,
                "final_train_loss": history[-1] if history else None}
    if loss == "cox":
        describe["ties"] = s.ties
    if edges is not None:
        describe["bin_edges_days"] = edges.tolist()
        edges = np.append(edges, max(float(time.max()), float(edges[-1]) + 1.0))
    if loss == "ce":  # CLAM's instance clustering settings (survival heads do without)
        describe |= {k: network.config[k] for k in network.options}
    return MILModel(network, loss, mean, std, edges, history, describe)


train_abmil = train_mil  # its name before the other networks came
