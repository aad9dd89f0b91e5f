"""Zarr embedding store vs TRIDENT-style fp32 .h5 files, side by side on the same synthetic slides.

Prints, in one run: bytes per tile (target Zarr/h5 ≤ 0.5), whole-slide read throughput (target Zarr/h5
≥ 1.0) and the time to read 512 sorted random rows per slide (reported). The slides are 2560-d, with
the structure real encoder outputs have (a low-rank tissue-type subspace, spatially clustered types,
a few large-magnitude channels), not white noise. Everything is written under a temporary folder and
deleted afterwards. Page caches are dropped before each read phase where the OS allows it (root).

    python bench/store_bench.py [--slides 50 --min-tiles 2000 --max-tiles 20000 --dim 2560]
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

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from store import EmbeddingStore  # noqa: E402
from store.provenance import provenance  # noqa: E402

RANDOM_ROWS = 512
WRITE_BLOCK = 4096  # what the extractor streams per append


class SyntheticCohort:
    """Embeddings with realistic structure: slide mean + tissue-type mixture in a rank-64 subspace + noise."""

    def __init__(self, dim: int, seed: int = 0, n_types: int = 8, rank: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.seed = dim, seed
        self.basis = rng.normal(size=(rank, dim)) / np.sqrt(rank)
        self.scale = np.exp(rng.normal(0, 0.5, dim))
        self.scale[rng.choice(dim, 8, replace=False)] *= 30  # ViT "massive activation" channels
        self.types = rng.normal(size=(n_types, rank)) * 2

    def slide(self, index: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        side = int(np.ceil(np.sqrt(n)))
        gx, gy = np.arange(n) % side, np.arange(n) // side
        coords = np.stack([gx, gy], 1).astype(np.int64) * 448  # 224 px at 0.5 µm on a 0.25 µm/px slide
        blob = 12  # tissue types come in spatial patches of ~12 x 12 tiles
        kind = (gx // blob + 3 * (gy // blob) + rng.integers(0, 8)) % len(self.types)
        latent = self.types[kind] + rng.normal(size=(n, self.basis.shape[0])) * 0.7 + rng.normal(size=self.basis.shape[0]) * 0.5
        emb = (latent @ self.basis) * self.scale + rng.normal(size=(n, self.dim)).astype(np.float32) * 0.3 * self.scale
        tissue = rng.uniform(0.25, 1.0, n).astype(np.float32)
        return coords, tissue, emb.astype(np.float32)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def write_both(cohort: SyntheticCohort, sizes: list[int], zarr_url: str, h5_dir: Path) -> dict[str, float]:
    spec = {"encoder": {"name": "bench-synthetic", "dim": cohort.dim, "dtype": "float16"},
            "tiling": {"target_mpp": 0.5, "tile_px": 224, "stride_px": 224}}
    store = EmbeddingStore.create_or_open(zarr_url, kind="slides", spec=spec, config={"bench": "store_bench"})
    h5_dir.mkdir(parents=True)
    t_zarr = t_h5 = 0.0
    for i, n in enumerate(sizes):
        coords, tissue, emb = cohort.slide(i, n)
        t0 = time.perf_counter()
        with store.write_slide(f"slide{i:03d}", {"patient_id": f"P{i:03d}"}) as writer:
            for start in range(0, n, WRITE_BLOCK):
                rows = slice(start, start + WRITE_BLOCK)
                writer.append(coords[rows], tissue[rows], emb[rows])
            writer.commit()
        t1 = time.perf_counter()
        with h5py.File(h5_dir / f"slide{i:03d}.h5", "w") as f:  # as TRIDENT saves: whole arrays, fp32, int64
            f["features"] = emb
            f["coords"] = coords
            f["coords"].attrs.update({"patch_size": 224, "patch_size_level0": 448})
        t_h5 += time.perf_counter() - t1
        t_zarr += t1 - t0
    return {"zarr_write_s": t_zarr, "h5_write_s": t_h5}


def read_whole(zarr_url: str, h5_dir: Path, ids: list[str]) -> dict[str, float]:
    out = {"cache_dropped": drop_page_cache()}
    store = EmbeddingStore.open(zarr_url)
    t0 = time.perf_counter()
    for sid in ids:
        store.slide(sid).embeddings()
    out["zarr_read_s"] = time.perf_counter() - t0
    drop_page_cache()
    t0 = time.perf_counter()
    for sid in ids:
        with h5py.File(h5_dir / f"{sid}.h5", "r") as f:
            f["features"][...]
    out["h5_read_s"] = time.perf_counter() - t0
    return out


def read_random(zarr_url: str, h5_dir: Path, ids: list[str], sizes: list[int], seed: int = 1) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(n, min(RANDOM_ROWS, n), replace=False)) for n in sizes]
    drop_page_cache()
    store = EmbeddingStore.open(zarr_url)
    t0 = time.perf_counter()
    for sid, idx in zip(ids, picks):
        store.slide(sid).embeddings(idx)
    zarr_s = time.perf_counter() - t0
    drop_page_cache()
    t0 = time.perf_counter()
    for sid, idx in zip(ids, picks):
        with h5py.File(h5_dir / f"{sid}.h5", "r") as f:
            f["features"][idx]
    return {"zarr_random_s": zarr_s, "h5_random_s": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=50)
    parser.add_argument("--min-tiles", type=int, default=2000)
    parser.add_argument("--max-tiles", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    sizes = [int(n) for n in rng.integers(args.min_tiles, args.max_tiles + 1, args.slides)]
    ids = [f"slide{i:03d}" for i in range(args.slides)]
    cohort = SyntheticCohort(args.dim, args.seed)
    work = Path(tempfile.mkdtemp(prefix="store_bench_", dir=args.workdir))
    try:
        zarr_url, h5_dir = str(work / "store"), work / "h5"
        print(f"{args.slides} slides, {sum(sizes):,} tiles of {args.dim}-d (seed {args.seed}) in {work}")
        timing = write_both(cohort, sizes, zarr_url, h5_dir)
        timing |= read_whole(zarr_url, h5_dir, ids)
        timing |= read_random(zarr_url, h5_dir, ids, sizes)
        zarr_bytes, h5_bytes = folder_bytes(work / "store"), folder_bytes(h5_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tiles = sum(sizes)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "slides": args.slides, "tiles": tiles, "dim": args.dim,
        "bytes_per_tile": {"zarr": zarr_bytes / tiles, "h5": h5_bytes / tiles},
        "bytes_ratio_zarr_over_h5": zarr_bytes / h5_bytes,
        "whole_read_tiles_per_s": {"zarr": tiles / timing["zarr_read_s"], "h5": tiles / timing["h5_read_s"]},
        "whole_read_throughput_ratio_zarr_over_h5": timing["h5_read_s"] / timing["zarr_read_s"],
        "random512_s_per_slide": {"zarr": timing["zarr_random_s"] / args.slides, "h5": timing["h5_random_s"] / args.slides},
        "random512_speed_ratio_zarr_over_h5": timing["h5_random_s"] / timing["zarr_random_s"],
        "write_tiles_per_s": {"zarr": tiles / timing["zarr_write_s"], "h5": tiles / timing["h5_write_s"]},
        "page_cache_dropped_before_reads": timing["cache_dropped"],
        "versions": provenance()["packages"],
    }
    print(f"{'':34}{'zarr':>14}{'h5 (fp32)':>14}{'ratio':>10}  target")
    print(f"{'bytes per tile':34}{result['bytes_per_tile']['zarr']:>14.0f}{result['bytes_per_tile']['h5']:>14.0f}"
          f"{result['bytes_ratio_zarr_over_h5']:>10.3f}  <= 0.5")
    print(f"{'whole-slide read, tiles/s':34}{result['whole_read_tiles_per_s']['zarr']:>14,.0f}"
          f"{result['whole_read_tiles_per_s']['h5']:>14,.0f}{result['whole_read_throughput_ratio_zarr_over_h5']:>10.2f}  >= 1.0")
    print(f"{'512 sorted random rows, ms/slide':34}{result['random512_s_per_slide']['zarr'] * 1e3:>14.1f}"
          f"{result['random512_s_per_slide']['h5'] * 1e3:>14.1f}{result['random512_speed_ratio_zarr_over_h5']:>10.2f}  (reported; speed ratio)")
    print(f"{'write, tiles/s':34}{result['write_tiles_per_s']['zarr']:>14,.0f}{result['write_tiles_per_s']['h5']:>14,.0f}")
    print(f"page cache dropped before reads: {result['page_cache_dropped_before_reads']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
