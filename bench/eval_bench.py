"""Re-fitting heads from the cache vs re-encoding: seconds per full cross-validation, side by side.

Writes a store of synthetic slides (2560-d, 512 tiles each, a planted risk direction) and a clinical
table, then times, from the store, 5-fold Coxnet on the stored slide vectors (target on 2 cores: ≤ 10 s)
and 5-fold ABMIL-Cox on the tiles, at most 512 sampled per bag (target: ≤ 10 min), and prints each
one's ratio to what re-encoding those slides would cost at the encoder throughput measured on an H200
(bench/RESULTS.md: 1,160 tiles/s for Virchow-2 in bf16), for the given tiles per slide.

    python bench/eval_bench.py [--slides 1000 --dim 2560 --tiles 512 --tiles-per-real-slide 10000 --skip-abmil]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate.abmil import TrainSettings, load_bags  # noqa: E402
from evaluate.features import patient_features  # noqa: E402
from evaluate.survival import cross_validate  # noqa: E402
from slidecache.cohorts.clinical import load_clinical  # noqa: E402
from slidecache.cohorts.splits import make_folds  # noqa: E402
from slidecache.provenance import provenance  # noqa: E402
from store import EmbeddingStore  # noqa: E402

H200_VIRCHOW2_TILES_PER_S = 1160.0


def write_cohort(root: Path, slides: int, dim: int, tiles: int, seed: int = 0) -> tuple[str, Path]:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    risk = rng.normal(size=slides)
    spec = {"encoder": {"name": "bench-synthetic", "dim": dim, "dtype": "float16"}, "tiling": {"tile_px": 224}}
    url = str(root / "store")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec)
    coords = np.stack([np.arange(tiles) * 448, np.zeros(tiles)], 1).astype(np.int64)
    for i in range(slides):
        emb = (risk[i] * 3 * direction + rng.normal(size=(tiles, dim))).astype(np.float16)
        with store.write_slide(f"S{i:05d}", {"patient_id": f"P{i:05d}"}) as writer:
            writer.append(coords, np.ones(tiles), emb)
            writer.commit()
    event_time = rng.exponential(1 / (0.001 * np.exp(1.5 * risk)))
    censor = rng.uniform(200, 3000, slides)
    table = root / "clinical.csv"
    rows = [f"P{i:05d},{int(event_time[i] <= censor[i])},{min(event_time[i], censor[i]):.1f}" for i in range(slides)]
    table.write_text("patient_id,OS,OS.time\n" + "\n".join(rows) + "\n")
    return url, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--tiles", type=int, default=512, help="tiles stored per synthetic slide")
    parser.add_argument("--tiles-per-real-slide", type=int, default=10000, help="for the re-encoding comparison")
    parser.add_argument("--max-tiles", type=int, default=512, help="tiles sampled per ABMIL bag")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="ABMIL epochs (default: the CLI's)")
    parser.add_argument("--skip-abmil", action="store_true")
    parser.add_argument("--device", default="auto", help="where ABMIL trains: auto (CUDA when visible), cpu, cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    try:
        t0 = time.perf_counter()
        url, table = write_cohort(work, args.slides, args.dim, args.tiles)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = patient_features(EmbeddingStore.open(url), load_clinical(table))
        load_s = time.perf_counter() - t0
        _, _, events = data.endpoint("OS")
        folds = make_folds(data.patient_ids, events, 5, 0)
        t0 = time.perf_counter()
        result = cross_validate(data, "OS", "coxnet", folds)
        coxnet_s = time.perf_counter() - t0
        print(f"5-fold Coxnet: {coxnet_s:.1f} s", flush=True)
        abmil: dict = {}
        if not args.skip_abmil:
            t0 = time.perf_counter()
            bags = load_bags(EmbeddingStore.open(url), data.slides, args.max_tiles, 0)
            abmil["load_bags_s"] = time.perf_counter() - t0
            print(f"read {sum(len(b) for b in bags):,} tiles into bags: {abmil['load_bags_s']:.1f} s", flush=True)
            t0 = time.perf_counter()
            settings = TrainSettings(epochs=args.epochs, device=args.device)
            abmil_result = cross_validate(data, "OS", "abmil-cox", folds, 0, bags, settings)
            abmil["abmil_cox_5fold_s"] = time.perf_counter() - t0
            abmil["abmil_cox_harrell_c"] = abmil_result.summary["harrell_c"]["mean"]
            abmil["abmil_settings"] = vars(settings) | {"max_tiles": args.max_tiles}
            del bags
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reencode_s = args.slides * args.tiles_per_real_slide / H200_VIRCHOW2_TILES_PER_S
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        "slides": args.slides, "dim": args.dim, "tiles_per_slide_stored": args.tiles,
        "store_write_s": write_s, "load_pooled_vectors_s": load_s,
        "coxnet_5fold_s": coxnet_s, "coxnet_harrell_c": result.summary["harrell_c"]["mean"],
        "reencode_s_at_h200_rate": reencode_s, "speedup_vs_reencode": reencode_s / (load_s + coxnet_s),
        **abmil,
        "versions": provenance()["packages"],
    }
    print(f"{args.slides} slides of {args.dim}-d: read pooled vectors {load_s:.1f} s, 5-fold Coxnet {coxnet_s:.1f} s "
          f"(target <= 10 s; C = {out['coxnet_harrell_c']:.3f})")
    print(f"re-encoding {args.slides} slides x {args.tiles_per_real_slide} tiles at {H200_VIRCHOW2_TILES_PER_S:.0f} tiles/s "
          f"(one H200) would take {reencode_s / 3600:.1f} h: the cache is {out['speedup_vs_reencode']:,.0f}x faster per re-fit")
    if abmil:
        total = abmil["load_bags_s"] + abmil["abmil_cox_5fold_s"]
        out["abmil_speedup_vs_reencode"] = reencode_s / total
        print(f"5-fold ABMIL-Cox ({args.epochs} epochs, <= {args.max_tiles} tiles/bag): read bags {abmil['load_bags_s']:.1f} s, "
              f"train+score {abmil['abmil_cox_5fold_s']:.1f} s (target <= 600 s; C = {abmil['abmil_cox_harrell_c']:.3f}); "
              f"{out['abmil_speedup_vs_reencode']:,.0f}x faster than re-encoding")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
