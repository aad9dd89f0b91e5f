"""The store half of the main job, runnable before extraction exists.

Writes a small cohort of SYNTHETIC embeddings (no encoder is run: labelled as such in the store) through
the real store API, verifies it, exports TRIDENT .h5 files, imports them back and prints what is there.
Seeds are fixed; the output folder records its provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from store import EmbeddingStore
from store.h5io import export_h5, import_h5
from store.provenance import provenance
from store.verify import verify_store

SEED = 0
DIM = 128  # virchow2-tiny's embedding width


def synthetic_spec() -> dict:
    return {
        "encoder": {"name": "synthetic-no-encoder", "weights_id": f"numpy-rng:seed={SEED}", "weights_sha256": None,
                    "pooling": "none", "preprocessing": None, "dim": DIM, "dtype": "float16"},
        "tiling": {"target_mpp": 0.5, "tile_px": 224, "stride_px": 224, "tissue": {"method": "synthetic"}},
    }


def run(out_dir: Path, n_slides: int = 12) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    url = str(out_dir / "store.zarr")
    config = {"demo": "store", "seed": SEED, "slides": n_slides, "out_dir": str(out_dir)}
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=synthetic_spec(), config=config)
    written = skipped = 0
    for i in range(n_slides):
        slide_id = f"DEMO-{i // 2:03d}-S{i % 2}"  # two slides per patient
        if slide_id in store:
            skipped += 1
            continue
        n = int(rng.integers(200, 3000))
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 448
        emb = (rng.normal(size=DIM) + 0.5 * rng.normal(size=(n, DIM))).astype(np.float16)
        with store.write_slide(slide_id, {"patient_id": slide_id[:8], "mpp": 0.25, "mpp_source": "synthetic",
                                          "reader": "none (synthetic embeddings)"}) as writer:
            writer.append(coords, rng.uniform(0.25, 1, n), emb)
            writer.commit()
        written += 1
    problems = verify_store(store)
    h5_files = export_h5(store, out_dir / "h5")
    reimported = import_h5(out_dir / "h5", str(out_dir / "reimported.zarr"), "synthetic-no-encoder")
    summary = {
        "store": url,
        "slides": len(store.slide_ids()),
        "tiles": sum(store.slide(s).n_tiles for s in store.slide_ids()),
        "written_now": written,
        "skipped_already_complete": skipped,
        "verify_problems": [str(p) for p in problems],
        "h5_files": len(h5_files),
        "reimported_slides": len(reimported.slide_ids()),
        "note": "extraction is not built yet: these embeddings are synthetic numbers, not encoder outputs",
    }
    (out_dir / "run_manifest.json").write_text(json.dumps({"summary": summary, "provenance": provenance(config)}, indent=2))
    return summary
