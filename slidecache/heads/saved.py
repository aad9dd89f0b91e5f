"""Heads refit on every patient of an evaluation and saved without pickle, to predict for a new slide
(`python -m evaluate survival|grade ... --save-head DIR`, read by `python -m train.generate --slide`).

A linear head (coxnet and coxph: scaler → [PCA →] Cox; logreg: scaler → logistic regression) is saved as the
affine map it computes, x @ W + b, read off the fitted pipeline and checked against it on the patients it
was fitted on; a MIL head (ABMIL, TransMIL, CLAM-SB, DSMIL) as its network's tensors, its input statistics and
the arguments its network is rebuilt from (a card without an architecture is an ABMIL's). Tensors go to
`head.safetensors`, the rest to `head.json`: task, head, endpoint or classes, pooling, the store's
fingerprint, and for survival the risk cut (the median risk of the patients it was fitted on: above it is
the high-risk group). A random survival forest cannot be written without pickle, so it is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from slidecache.errors import EvaluationError
from slidecache.heads.mil import MILModel
from slidecache.heads.networks import ARCHITECTURES, build_network
from slidecache.heads.slide_tiles import SlideTiles
from slidecache.json_out import dumps
from slidecache.provenance import provenance

TENSORS, CARD = "head.safetensors", "head.json"
MIL_SURVIVAL = tuple(f"{architecture}-{loss}" for architecture in ARCHITECTURES for loss in ("cox", "nll"))
SAVABLE_SURVIVAL = ("coxnet", "coxph", *MIL_SURVIVAL)
SAVABLE_GRADE = ("logreg", *ARCHITECTURES)


def check_savable(task: str, head: str) -> None:
    allowed = SAVABLE_SURVIVAL if task == "survival" else SAVABLE_GRADE
    if head not in allowed:
        raise EvaluationError(f"--save-head: a {head} head cannot be saved without pickle (a forest of trees); "
                              f"save one of {', '.join(allowed)}")


def affine_map(predict: Callable[[np.ndarray], np.ndarray], dim: int, fitted_on: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(W (D, K), b (K,)) with predict(x) == x @ W + b, read at 0 and the unit vectors, checked on `fitted_on`."""
    zero = predict(np.zeros((1, dim)))
    weight = predict(np.eye(dim)) - zero
    bias = zero[0]
    expected = predict(fitted_on)
    got = fitted_on @ weight + bias
    if not np.allclose(got, expected, rtol=1e-6, atol=1e-8 * (1 + float(np.abs(expected).max()))):
        raise EvaluationError(f"the head is not affine in its input (largest gap {np.abs(got - expected).max():.3g}): "
                              "it cannot be saved as x @ W + b")
    return weight, bias


def _columns(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(len(values), -1)


def _mil_tensors(model: MILModel) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    net = model.network
    tensors = {f"network.{k}": v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    tensors |= {"input_mean": np.asarray(model.mean, np.float32), "input_std": np.asarray(model.std, np.float32)}
    if model.bin_edges is not None:
        tensors["bin_edges"] = np.asarray(model.bin_edges, np.float64)
    return tensors, {"architecture": net.architecture, **net.config, "loss": model.loss}


def _write(folder: str | Path, tensors: dict[str, np.ndarray], card: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (TENSORS + ".partial")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(partial))
    partial.replace(folder / TENSORS)
    (folder / CARD).write_text(dumps(provenance(card) | card))  # strict JSON: a null metric, never NaN
    return folder


def save_survival_head(folder: str | Path, head: str, fitted: Any, x: np.ndarray, endpoint: str, pooling: str,
                       store_fingerprint: str, summary: dict[str, Any]) -> Path:
    """`fitted`: the FittedHead refit on every patient (x: their features or tile bags)."""
    check_savable("survival", head)
    risks = np.asarray(fitted.risk(x), dtype=np.float64)
    card = {"task": "survival", "head": head, "endpoint": endpoint, "pooling": pooling,
            "store_fingerprint": store_fingerprint, "risk_cut": float(np.median(risks)), "patients": int(len(x)),
            "risk_cut_rule": "median risk of the patients the head was fitted on; above it: high risk",
            "cross_validated": summary}
    if head in MIL_SURVIVAL:
        tensors, shape = _mil_tensors(fitted.model)
        return _write(folder, tensors, card | {"kind": "abmil", "network": shape})  # kind: any MIL network
    weight, bias = affine_map(lambda v: _columns(fitted.risk(v)), x.shape[1], np.asarray(x, np.float64))
    return _write(folder, {"weight": weight, "bias": bias}, card | {"kind": "affine", "output": "risk"})


def save_grade_head(folder: str | Path, head: str, model: Any, x: np.ndarray, classes: list[str], scheme: str,
                    pooling: str, store_fingerprint: str, summary: dict[str, Any]) -> Path:
    """`model`: the grade model refit on every patient (a scaler + LogisticRegression pipeline, or a MILModel)."""
    check_savable("grade", head)
    card = {"task": "grade", "head": head, "classes": classes, "scheme": scheme, "pooling": pooling,
            "store_fingerprint": store_fingerprint, "patients": int(len(x)), "cross_validated": summary}
    if head in ARCHITECTURES:
        tensors, shape = _mil_tensors(model)
        return _write(folder, tensors, card | {"kind": "abmil", "network": shape})  # kind: any MIL network
    trained = [classes[i] for i in model.classes_]
    weight, bias = affine_map(lambda v: _columns(model.decision_function(v)), x.shape[1], np.asarray(x, np.float64))
    return _write(folder, {"weight": weight, "bias": bias},
                  card | {"kind": "affine", "output": "sigmoid" if len(trained) == 2 else "softmax",
                          "output_classes": trained})


@dataclass
class SavedHead:
    card: dict[str, Any]
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    abmil: MILModel | None = None  # any MIL head (the name train.slide_report reads)

    @property
    def task(self) -> str:
        return str(self.card["task"])

    def _scores(self, slide: SlideTiles) -> np.ndarray:
        if self.abmil is not None:
            tiles = [slide.embeddings().astype(np.float32)]
            return (self.abmil.outputs(tiles) if self.task == "grade" else self.abmil.risk(tiles).reshape(1, 1))[0]
        assert self.weight is not None and self.bias is not None
        return slide.pooled(self.card["pooling"]).astype(np.float64) @ self.weight + self.bias

    def predict(self, slide: SlideTiles) -> dict[str, Any]:
        """Survival: risk and group (high above the saved cut); grade: class probabilities and the most likely."""
        scores = self._scores(slide)
        if self.task == "survival":
            risk = float(scores.reshape(-1)[0])
            return {"endpoint": self.card["endpoint"], "risk": risk, "risk_cut": self.card["risk_cut"],
                    "risk_group": "high" if risk > self.card["risk_cut"] else "low", "head": self.card["head"]}
        classes = self.card.get("output_classes") or self.card["classes"]
        if self.card.get("output") == "sigmoid":
            p = 1 / (1 + np.exp(-float(scores.reshape(-1)[0])))
            probabilities = np.array([1 - p, p])
        else:
            e = np.exp(scores - scores.max())
            probabilities = e / e.sum()
        ranked = {c: float(v) for c, v in zip(classes, probabilities)}
        return {"grade": max(ranked, key=ranked.get), "probabilities": ranked, "head": self.card["head"]}


def load_head(folder: str | Path, store_fingerprint: str | None = None) -> SavedHead:
    """A saved head; refused when it was fitted on another store's embeddings (other encoder or tiling)."""
    folder = Path(folder)
    if not (folder / CARD).is_file() or not (folder / TENSORS).is_file():
        raise EvaluationError(f"{folder} holds no saved head ({CARD} and {TENSORS}): write one with "
                              "`python -m evaluate survival|grade ... --save-head DIR`")
    card = json.loads((folder / CARD).read_text())
    if store_fingerprint and card.get("store_fingerprint") != store_fingerprint:
        raise EvaluationError(f"{folder}: this head was fitted on a store with fingerprint "
                              f"{str(card.get('store_fingerprint'))[:12]}, not {store_fingerprint[:12]} (another "
                              "encoder or tiling): its inputs would mean something else")
    tensors = load_file(str(folder / TENSORS))
    if card["kind"] == "affine":
        return SavedHead(card, tensors["weight"], tensors["bias"])
    shape = dict(card["network"])
    loss = shape.pop("loss")
    network = build_network(shape.pop("architecture", "abmil"), **shape)
    network.load_state_dict({k.removeprefix("network."): torch.from_numpy(v.copy()) for k, v in tensors.items()
                             if k.startswith("network.")})
    model = MILModel(network, loss, tensors["input_mean"], tensors["input_std"], tensors.get("bin_edges"))
    return SavedHead(card, abmil=model)
