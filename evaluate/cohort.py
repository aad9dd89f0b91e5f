"""What the heads are fitted on: the store's patients joined with the clinical table(s), and their folds.

One settings object for the cohort every command shares (the tables, a cancer type, the folds or a split
file, the seed), so the CLI and the demo read a cohort the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from evaluate.features import PatientData, SetCoverage, patient_features, set_features
from slidecache.cohorts.clinical import ClinicalTable, load_clinical_tables
from slidecache.cohorts.splits import make_folds, read_split
from slidecache.errors import ClinicalTableError, EvaluationError
from store.embedding_store import EmbeddingStore


@dataclass(frozen=True)
class CohortSettings:
    clinical: Sequence[str]  # clinical table(s): TCGA-CDR, SurvPath, slidecache
    cancer_type: str | None = None  # keep only this cancer type (pan-cancer tables)
    folds: int = 5
    seed: int = 0
    split: str | None = None  # a split file; None: folds made from the seed

    def table(self) -> ClinicalTable:
        clinical = load_clinical_tables(self.clinical)
        return clinical.filter_cancer_type(self.cancer_type) if self.cancer_type else clinical

    def folds_of(self, data: PatientData, endpoint: str | None = None) -> dict[str, int]:
        """The split file when given, else folds made here from the seed (stratified by the endpoint's event)."""
        if self.split:
            return read_split(self.split)
        if endpoint is None:
            return make_folds(data.patient_ids, None, self.folds, self.seed)
        has, _, events = data.endpoint(endpoint)
        return make_folds(data.patient_ids, np.where(has, events, False), self.folds, self.seed)


def open_patients(store_url: str, cohort: CohortSettings, endpoint: str | None = None,
                  pooling: str = "mean") -> tuple[EmbeddingStore, PatientData]:
    """The store and its patients joined with the cohort's table; with `endpoint`, a table lacking its
    columns is refused by name (rather than as "no patient has OS")."""
    store = EmbeddingStore.open(store_url)
    clinical = cohort.table()
    if endpoint and (why := clinical.absent_endpoint(endpoint)):
        raise ClinicalTableError(why)
    return store, patient_features(store, clinical, pooling)


def open_set_patients(store_url: str, cohort: CohortSettings, name: str, endpoint: str | None = None
                      ) -> tuple[EmbeddingStore, PatientData, SetCoverage]:
    """As `open_patients`, each patient's vector from the store's slide-embedding set `name` (and which slides
    the set lacks)."""
    store = EmbeddingStore.open(store_url)
    clinical = cohort.table()
    if endpoint and (why := clinical.absent_endpoint(endpoint)):
        raise ClinicalTableError(why)
    data, coverage = set_features(store, clinical, name)
    return store, data, coverage


def refuse_tiles_with_set(name: str, head: str, tiles: bool, save_head: str | None) -> None:
    """What a head on a set's slide vectors cannot do, refused before anything is read."""
    if tiles:
        raise EvaluationError(f"--head {head} trains on the tiles, not on slide vectors: with --slide-embeddings "
                              f"{name} use a slide-vector head (coxnet, coxph, rsf; logreg for grade)")
    if save_head:
        raise EvaluationError(f"--save-head saves a head applied to a new slide's pooled tiles; one fitted on "
                              f"slide-embedding set {name!r} cannot be applied that way: leave out --save-head")


def site_folds(data: PatientData, endpoint: str, folds: int, seed: int,
               site_preserving: bool = False) -> dict[str, int]:
    """Patient folds stratified by the endpoint's event; `site_preserving` keeps each tissue source site in one."""
    has, _, events = data.endpoint(endpoint)
    sites = [c.site or "?" for c in data.clinical] if site_preserving else None
    return make_folds(data.patient_ids, np.where(has, events, False), folds, seed, sites)


def store_patient_of(store_url: str) -> Callable[[str], str]:
    """Slide id → the store's patient id (non-TCGA slide ids carry no patient in their name); others kept."""
    store = EmbeddingStore.open(store_url)
    known = {sid: store.slide(sid).patient_id for sid in store.slide_ids()}
    return lambda slide_id: known.get(slide_id, slide_id)
