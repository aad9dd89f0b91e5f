"""Patient-level features from the cache: each patient's slides' stored pooled vectors, averaged.

Slide-level heads read only `pooled_mean` / `pooled_max` (written at extraction), never the tiles; a
patient's several slides are pooled into one vector so a patient is one sample, as the folds require.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from slidecache.cohorts.clinical import ENDPOINTS, ClinicalTable, PatientClinical
from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError
from store.embedding_store import EmbeddingStore
from store.slide_view import SlideView

POOLINGS = ("mean", "max", "cls")


@dataclass
class PatientData:
    patient_ids: list[str]
    features: np.ndarray  # (P, D) float32
    slides: list[list[str]]
    clinical: list[PatientClinical]

    def __len__(self) -> int:
        return len(self.patient_ids)

    def subset(self, mask: np.ndarray) -> PatientData:
        idx = np.flatnonzero(mask)
        return PatientData([self.patient_ids[i] for i in idx], self.features[idx],
                           [self.slides[i] for i in idx], [self.clinical[i] for i in idx])

    def endpoint(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(has_endpoint mask, times in days, events) over all patients (times/events 0 where missing)."""
        if name not in ENDPOINTS:
            raise EvaluationError(f"unknown endpoint {name!r}; choose one of {', '.join(ENDPOINTS)}")
        has = np.array([name in c.endpoints for c in self.clinical])
        times = np.array([c.endpoints[name].time_days if name in c.endpoints else 0.0 for c in self.clinical])
        events = np.array([c.endpoints[name].event if name in c.endpoints else False for c in self.clinical])
        return has, times, events


def slides_by_patient(store: EmbeddingStore) -> dict[str, list[SlideView]]:
    """Complete slides with tiles, grouped by patient; each slide opened once and its view kept."""
    grouped: dict[str, list[SlideView]] = defaultdict(list)
    for slide_id in store.slide_ids():
        slide = store.slide(slide_id)
        if slide.n_tiles:
            grouped[patient_key(slide.patient_id)].append(slide)
    return dict(grouped)


def patient_features(store: EmbeddingStore, clinical: ClinicalTable, pooling: str = "mean") -> PatientData:
    """Join the store's slides with the clinical table on patient id; one pooled vector per patient."""
    if pooling not in POOLINGS:
        raise EvaluationError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    grouped = slides_by_patient(store)
    shared = sorted(set(grouped) & set(clinical.patients))
    if not shared:
        raise EvaluationError(
            f"the clinical table {clinical.path} shares no patient with the store {store.url} "
            f"(store patients look like {sorted(grouped)[:3]}, table patients like {sorted(clinical.patients)[:3]}); "
            "check that both use the same patient ids (TCGA: the first 12 characters of the barcode)"
        )
    features = np.stack([np.mean([s.pooled(pooling) for s in grouped[pid]], axis=0) for pid in shared]).astype(np.float32)
    slides = [[s.slide_id for s in grouped[pid]] for pid in shared]
    return PatientData(shared, features, slides, [clinical.patients[p] for p in shared])
