"""What survival and grade evaluations share in their outputs: the metrics.json + predictions.csv pair, a
metric summary as one printed cell, the record of a head that could not be estimated, and the lines naming a
slide-embedding set read."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from slidecache.json_out import dumps
from slidecache.provenance import provenance

if TYPE_CHECKING:
    from evaluate.features import SetCoverage


def format_summary(value: Mapping[str, Any]) -> str:
    """'0.812 ± 0.030', with the folds that could not be scored, or 'not computed: reason'."""
    missing = value.get("not_computed_in_folds") or {}
    if value.get("mean") is None:
        reasons = sorted(set(missing.values()))
        return "not computed: " + ("; ".join(reasons[:2]) or "no fold could be scored")
    text = f"{value['mean']:.3f} ± {value['std']:.3f}"
    if missing:
        fold, reason = next(iter(missing.items()))
        text += f"  ({value['folds']} folds; not in {len(missing)}, e.g. fold {fold}: {reason})"
    return text


def write_metrics(out: Path, record: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]) -> None:
    """metrics.json (strict JSON: a non-finite float is null, never NaN) and predictions.csv, one row a patient."""
    (out / "metrics.json").write_text(dumps(record))
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(predictions[0]))
        writer.writeheader()
        writer.writerows(predictions)


def not_estimated(head: str, error: Exception) -> dict[str, Any]:
    """A head that cannot be estimated on this cohort: recorded with the reason instead of its metrics."""
    return {"head": head, "error": str(error)}


def run_extras(config: Mapping[str, Any] | None, heatmaps: Any, saved_head: Any) -> dict[str, Any]:
    """What a head's metrics.json ends with when the run has it: provenance, heatmaps drawn, the head saved."""
    extras: dict[str, Any] = {}
    if config is not None:
        extras["provenance"] = provenance(config)
    if heatmaps is not None:
        extras["heatmaps"] = heatmaps
    if saved_head is not None:
        extras["saved_head"] = saved_head
    return extras


def set_lines(coverage: SetCoverage | None) -> list[str]:
    """The set a head read (name, fingerprint, slide encoder) and the slides it lacks."""
    if coverage is None:
        return []
    lines = [f"  slide vectors: set {coverage.name!r} ({coverage.slide_encoder}, fingerprint "
             f"{coverage.fingerprint[:12]}), {coverage.slides - len(coverage.missing)} of {coverage.slides} slides"]
    return lines + ([f"  {warning}"] if (warning := coverage.warning()) else [])


class WritesMetrics:
    """A head's evaluation that writes metrics.json, predictions.csv and its plot (survival, grade)."""

    def write(self, out: Path) -> None:
        write_metrics(out, self.record(), self.result.predictions)  # type: ignore[attr-defined]
        self.plot(out)  # type: ignore[attr-defined]
