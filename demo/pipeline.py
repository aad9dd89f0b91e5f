"""The main job end to end on embedded defaults (today: cohort → extraction → store checks → QC).

Writes a small cohort of synthetic pyramidal slides (fixed seeds; several slides per patient; nuclear
density varies across patients), extracts it with `virchow2-tiny` (random weights: the numbers mean
nothing, and the output says so) on a local Ray, verifies the store, exports TRIDENT .h5 files and writes
the QC pictures. A second run finds every slide complete and encodes nothing. Training and evaluation
join here when those stages land.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from demo.slides import synthetic_he, write_pyramid
from extract.config import CONFIG_DIR, ExtractConfig
from extract.job import Extraction, connect_ray
from extract.qc import write_qc
from store import EmbeddingStore
from store.cohort import load_cohort
from store.h5io import export_h5
from store.provenance import provenance
from store.verify import verify_store

SEED = 0


@dataclass(frozen=True)
class DemoSize:
    patients: int = 6
    slides_per_patient: int = 2
    height: int = 1600
    width: int = 2000


def write_cohort(out: Path, size: DemoSize, log: Callable[[str], None]) -> Path:
    """Synthetic slides at 0.25 µm/px; a CSV names slide, path and patient. Existing files are kept."""
    slides = out / "slides"
    rows = ["slide_id,path,patient_id"]
    written = 0
    for p in range(size.patients):
        density = 0.001 + 0.006 * p / max(1, size.patients - 1)  # the visual property that varies
        for s in range(size.slides_per_patient):
            slide_id = f"DEMO-P{p:03d}-S{s}"
            path = slides / f"{slide_id}.tiff"
            if not path.exists():
                seed = SEED + 100 * p + s
                write_pyramid(path, synthetic_he(size.height, size.width, seed=seed, nuclear_density=density), mpp=0.25)
                written += 1
            rows.append(f"{slide_id},{path},DEMO-P{p:03d}")
    table = out / "cohort.csv"
    table.write_text("\n".join(rows) + "\n")
    log(f"[demo] cohort: {len(rows) - 1} synthetic slides of {size.patients} patients ({written} written now) in {slides}")
    return table


def run(out: Path, size: DemoSize = DemoSize(), log: Callable[[str], None] = print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cohort = write_cohort(out, size, log)
    cfg = ExtractConfig.from_yaml(CONFIG_DIR / "extract" / "virchow2-tiny.yaml")
    store_url = str(out / "store.zarr")
    started_ray = connect_ray(cfg)
    try:
        summary = Extraction(load_cohort(cohort), store_url, cfg, log=log).run()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    log(summary.table())
    store = EmbeddingStore.open(store_url)
    problems = [str(p) for p in verify_store(store)]
    h5 = export_h5(store, out / "h5")
    qc = write_qc(store_url, out / "qc", summary)
    result = {
        "store": store_url,
        "encoder": "virchow2-tiny (random weights, labelled as such: its embeddings carry no pathology)",
        "slides_in_store": len(store.slide_ids()),
        "extracted_now": summary.count("done") + summary.count("empty"),
        "skipped_complete": summary.count("skipped"),
        "failed": [o.slide_id for o in summary.failed],
        "tiles_in_store": sum(store.slide(s).n_tiles for s in store.slide_ids()),
        "verify_problems": problems,
        "h5_files": len(h5),
        "qc_summary": str(qc),
    }
    manifest = {"summary": result, "provenance": provenance({"demo": "pipeline", "seed": SEED, "size": size.__dict__,
                                                             "extract": cfg.to_dict()})}
    (out / "run_manifest.json").write_text(json.dumps(manifest, indent=2))
    return result
