"""A tiny-encoder store with planted per-slide signal, report annotations from its clinical table, and a
meta JSON: the inputs every training test starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from slidecache.cohorts.clinical import load_clinical
from store import EmbeddingStore
from tests.evaluate.helpers import planted_cohort
from train.annotations import write_annotations, write_meta


@dataclass
class TrainInputs:
    root: Path
    store: str
    clinical: Path
    annotations: Path
    meta: Path

    def flags(self, output_dir: Path, *extra: str) -> list[str]:
        return ["--config", "tiny.yaml", "--meta_path", str(self.meta), "--store", self.store,
                "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "True", *extra]


def make_inputs(root: Path, patients: int) -> TrainInputs:
    url, table = planted_cohort(root, patients=patients)
    annotations = root / "annotations.jsonl"
    write_annotations(EmbeddingStore.open(url), load_clinical(table), annotations)
    return TrainInputs(root, url, table, annotations, write_meta(root / "meta.json", annotations))


@pytest.fixture(scope="session")
def four_slides(tmp_path_factory) -> TrainInputs:
    return make_inputs(tmp_path_factory.mktemp("train4"), 4)
