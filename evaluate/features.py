"""Patient-level features from the cache: each patient's slides' stored pooled vectors, averaged.

Slide-level heads read only `pooled_mean` / `pooled_max` (written at extraction), never the tiles; a
patient's several slides are pooled into one vector so a patient is one sample, as the folds require.
A slide-embedding set of the store (`extract slide-embeddings`: TITAN, PRISM, ...) is another source of
slide vectors (`set_features`), averaged over a patient's slides the same way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidecache.cohorts.clinical import ENDPOINTS, ClinicalTable, PatientClinical
from slidecache.cohorts.ids import patient_key
from slidecache.errors import EvaluationError, SlideNotFound
from store.backends import display_url
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


def _joined(store: EmbeddingStore, clinical: ClinicalTable) -> tuple[dict[str, list[SlideView]], list[str]]:
    """The store's slides by patient, and the patients the clinical table also has (sorted)."""
    grouped = slides_by_patient(store)
    shared = sorted(set(grouped) & set(clinical.patients))
    if not shared:
        raise EvaluationError(
            f"the clinical table {clinical.path} shares no patient with the store {store.url} "
            f"(store patients look like {sorted(grouped)[:3]}, table patients like {sorted(clinical.patients)[:3]}); "
            "check that both use the same patient ids (TCGA: the first 12 characters of the barcode)"
        )
    return grouped, shared


def patient_features(store: EmbeddingStore, clinical: ClinicalTable, pooling: str = "mean") -> PatientData:
    """Join the store's slides with the clinical table on patient id; one pooled vector per patient."""
    if pooling not in POOLINGS:
        raise EvaluationError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    grouped, shared = _joined(store, clinical)
    features = np.stack([np.mean([s.pooled(pooling) for s in grouped[pid]], axis=0) for pid in shared]).astype(np.float32)
    slides = [[s.slide_id for s in grouped[pid]] for pid in shared]
    return PatientData(shared, features, slides, [clinical.patients[p] for p in shared])


def set_label(name: str) -> str:
    """How rows and records name a set where they name a pooling (`set:titan`)."""
    return f"set:{name}"


def pooling_label(slide_embeddings: str | None, tiles: bool, pooling: str) -> str:
    """What a head read, as its records name it: a set, the tiles (a MIL head), or the pooling of slide vectors."""
    if slide_embeddings:
        return set_label(slide_embeddings)
    return "tiles" if tiles else pooling


@dataclass(frozen=True)
class SetCoverage:
    """Which of the joined patients' slides a slide-embedding set holds, and what to run for the others."""

    name: str
    fingerprint: str
    slide_encoder: str
    slides: int  # slides of the patients joined with the clinical table
    missing: list[str]  # of those, without a current embedding in the set (never made, failed, or stale)
    failed: list[str]  # of the missing, recorded as failed in the set
    stale: list[str]  # of the missing, made from tile rows written again since
    patients_left_out: list[str]  # every slide missing: no vector
    patients_partial: list[str]  # some slides missing: averaged over the others
    command: str  # what makes the missing ones

    def record(self) -> dict[str, Any]:
        """What metrics.json and sweep.json say of the set."""
        return {"name": self.name, "fingerprint": self.fingerprint, "slide_encoder": self.slide_encoder,
                "slides": self.slides, "slides_missing": len(self.missing), "slides_failed": len(self.failed),
                "slides_stale": len(self.stale), "missing_slide_ids": self.missing[:100],
                "patients_left_out": len(self.patients_left_out), "patients_partial": len(self.patients_partial),
                "make_missing": self.command if self.missing else None}

    def warning(self) -> str | None:
        """One line on the slides the set lacks (None when it has them all)."""
        if not self.missing:
            return None
        why = ", ".join(part for part in (f"{len(self.failed)} failed there" if self.failed else "",
                                          f"{len(self.stale)} stale (tiles written again since)" if self.stale else "")
                        if part)
        retry = " --retry-failed" if self.failed else ""
        return (f"warning: slide-embedding set {self.name!r} has no embedding of {len(self.missing)} of the "
                f"{self.slides} slides{f' ({why})' if why else ''}, e.g. {', '.join(self.missing[:3])}: "
                f"{len(self.patients_left_out)} patients left out, {len(self.patients_partial)} averaged over their "
                f"other slides; make them with `{self.command}{retry}`")


def set_features(store: EmbeddingStore, clinical: ClinicalTable, name: str) -> tuple[PatientData, SetCoverage]:
    """Join the store's slides with the clinical table as `patient_features` does, each patient's vector the mean
    of its slides' vectors in set `name`; the slides the set lacks are counted in the coverage, not hidden."""
    try:
        emb_set = store.slide_embedding_set(name)
    except SlideNotFound as e:  # names the sets there and the command that makes one
        raise EvaluationError(str(e)) from e
    grouped, shared = _joined(store, clinical)
    wanted = [s.slide_id for pid in shared for s in grouped[pid]]
    ids, vectors = emb_set.embeddings(current=True)
    row = {sid: i for i, sid in enumerate(ids)}
    missing = [sid for sid in wanted if sid not in row]
    failures, stale = (emb_set.failures(), emb_set.stale()) if missing else ({}, {})  # stale() reads every slide
    patients, features, slides, left_out, partial = [], [], [], [], []
    for pid in shared:
        have = [s.slide_id for s in grouped[pid] if s.slide_id in row]
        if not have:
            left_out.append(pid)
            continue
        if len(have) < len(grouped[pid]):
            partial.append(pid)
        patients.append(pid)
        features.append(vectors[[row[s] for s in have]].mean(axis=0))
        slides.append(have)
    encoder = str(emb_set.slide_encoder.get("name") or name)
    url = display_url(store.url)
    command = f"python -m extract slide-embeddings --store {url} --slide-encoder {encoder}" + \
        (f" --set {name}" if name != encoder else "")
    coverage = SetCoverage(name, emb_set.fingerprint, encoder, len(wanted), missing,
                           [s for s in missing if s in failures], [s for s in missing if s in stale], left_out,
                           partial, command)
    if not patients:
        raise EvaluationError(f"slide-embedding set {name!r} of {url} holds no slide of the {len(shared)} patients "
                              f"joined with the clinical table; make them with `{command}`")
    vectors_by_patient = np.stack(features).astype(np.float32)
    data = PatientData(patients, vectors_by_patient, slides, [clinical.patients[p] for p in patients])
    return data, coverage
