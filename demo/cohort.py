"""The demo cohort: synthetic pyramidal slides with a planted signal, a clinical table and report texts.

Each patient has a latent risk z ~ N(0, 1). It sets the nuclear density of the patient's slides (the
visual property: more hematoxylin, a bluer and busier texture, which even a random encoder carries), the
tumour grade (G1-G3 at fixed z cut-offs) and the survival time through an exponential hazard
0.0008 · exp(2.5 z) days⁻¹, with uniform censoring; every fourth patient has two slides. Sizes vary
from slide to slide. Everything follows from the seed.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from demo.slides import synthetic_he, write_pyramid

SEED = 0
MPP = 0.25
GRADE_CUTS = (-0.6, 0.6)  # z below → G1, between → G2, above → G3
BASE_HAZARD = 0.0008
HAZARD_SLOPE = 2.5  # log-hazard per unit of z: a perfect risk score would reach C ≈ 0.85


@dataclass(frozen=True)
class DemoSize:
    patients: int = 80
    two_slides_every: int = 4  # every k-th patient has a second slide
    min_side: int = 1000  # level-0 px (0.25 µm/px): slides are 250-450 µm wide ... tiny, to run in minutes
    max_side: int = 1800


@dataclass(frozen=True)
class DemoPatient:
    patient_id: str
    risk: float
    grade: str
    time_days: float
    event: bool
    slides: tuple[str, ...]


def nuclear_density(risk: float) -> float:
    """Nuclei per tissue pixel: 0.0015 (low risk) to 0.009 (high risk), monotone in z."""
    return 0.0015 + 0.0075 / (1 + np.exp(-1.5 * risk))


def plan_patients(size: DemoSize, seed: int = SEED) -> list[DemoPatient]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=size.patients)
    event_time = rng.exponential(1 / (BASE_HAZARD * np.exp(HAZARD_SLOPE * risk)))
    censor_time = rng.uniform(300, 4000, size.patients)
    patients = []
    for p in range(size.patients):
        pid = f"DEMO-P{p:03d}"
        n = 2 if size.two_slides_every and p % size.two_slides_every == size.two_slides_every - 1 else 1
        grade = f"G{1 + int(np.digitize(risk[p], GRADE_CUTS))}"
        patients.append(DemoPatient(pid, float(risk[p]), grade, float(round(min(event_time[p], censor_time[p]), 1)),
                                    bool(event_time[p] <= censor_time[p]), tuple(f"{pid}-S{s}" for s in range(n))))
    return patients


def _write_slide(path: Path, size: DemoSize, seed: int, p: int, s: int, risk: float) -> None:
    rng = np.random.default_rng([seed, p, s])
    height, width = (int(v) for v in rng.integers(size.min_side, size.max_side + 1, 2))
    pixels = synthetic_he(height, width, seed=seed + 1000 * p + s, nuclear_density=nuclear_density(risk))
    partial = path.with_name(f".{path.name}.partial")
    write_pyramid(partial, pixels, mpp=MPP)
    partial.replace(path)  # an interrupted run leaves no half-written slide behind


def write_slides(out: Path, size: DemoSize, patients: list[DemoPatient], log: Callable[[str], None],
                 seed: int = SEED) -> Path:
    """Pyramidal TIFFs (existing files kept), written on every core, and the cohort CSV naming slide, path
    and patient. Paths in the CSV are relative to the CSV's own folder, the rule every cohort table follows
    (so the folder can move, and `--out` may be relative to any working directory)."""
    folder = out / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,patient_id"]
    jobs = []
    for p, patient in enumerate(patients):
        for s, slide_id in enumerate(patient.slides):
            path = folder / f"{slide_id}.tiff"
            if not path.exists():
                jobs.append((path, size, seed, p, s, patient.risk))
            rows.append(f"{slide_id},{path.relative_to(out).as_posix()},{patient.patient_id}")
    if jobs:
        with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_slide, *zip(*jobs)))
    written = len(jobs)
    table = out / "cohort.csv"
    table.write_text("\n".join(rows) + "\n")
    log(f"[demo] cohort: {len(rows) - 1} synthetic slides of {len(patients)} patients ({written} written now) in {folder}")
    return table


def write_clinical(out: Path, patients: list[DemoPatient]) -> Path:
    """slidecache's clinical format: patient_id plus TCGA-CDR columns (OS=1 is death, times in days)."""
    stages = {"G1": "Stage I", "G2": "Stage II", "G3": "Stage III"}
    rows = ["patient_id,cancer_type,grade,age,stage,OS,OS.time"]
    for i, p in enumerate(patients):
        rows.append(f"{p.patient_id},DEMO,{p.grade},{45 + (i * 7) % 35},{stages[p.grade]},{int(p.event)},{p.time_days}")
    path = out / "clinical.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_report_texts(out: Path, patients: list[DemoPatient]) -> Path:
    """A morphology sentence per patient, from the labels (the answers' first part)."""
    import json

    words = {"G1": "well differentiated, sparse nuclei", "G2": "moderately differentiated, crowded nuclei",
             "G3": "poorly differentiated, densely packed pleomorphic nuclei"}
    path = out / "report_texts.jsonl"
    path.write_text("".join(json.dumps({"patient_id": p.patient_id, "text": f"Invasive carcinoma, {words[p.grade]}."})
                            + "\n" for p in patients))
    return path
