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
from slidecache.provenance import provenance  # noqa: E402
from store import EmbeddingStore  # noqa: E402

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


COMPRESSIONS = ("zstd", "none")  # both zarr layouts, each against the same h5 files


def write_all(cohort: SyntheticCohort, sizes: list[int], work: Path) -> dict[str, float]:
    spec = {"encoder": {"name": "bench-synthetic", "dim": cohort.dim, "dtype": "float16"},
            "tiling": {"target_mpp": 0.5, "tile_px": 224, "stride_px": 224}}
    stores = {c: EmbeddingStore.create_or_open(str(work / f"zarr-{c}"), kind="slides", spec=spec, compression=c,
                                               config={"bench": "store_bench"}) for c in COMPRESSIONS}
    (work / "h5").mkdir(parents=True)
    seconds = {name: 0.0 for name in (*COMPRESSIONS, "h5")}
    for i, n in enumerate(sizes):
        coords, tissue, emb = cohort.slide(i, n)
        for compression, store in stores.items():
            t0 = time.perf_counter()
            with store.write_slide(f"slide{i:03d}", {"patient_id": f"P{i:03d}"}) as writer:
                for start in range(0, n, WRITE_BLOCK):  # streamed, as the extractor writes
                    rows = slice(start, start + WRITE_BLOCK)
                    writer.append(coords[rows], tissue[rows], emb[rows])
                writer.commit()
            seconds[compression] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with h5py.File(work / "h5" / f"slide{i:03d}.h5", "w") as f:  # as TRIDENT saves: whole arrays, fp32, int64
            f["features"] = emb
            f["coords"] = coords
            f["coords"].attrs.update({"patch_size": 224, "patch_size_level0": 448})
        seconds["h5"] += time.perf_counter() - t0
    return seconds


def read_all(work: Path, ids: list[str], picks: list[np.ndarray] | None) -> dict[str, float]:
    """Seconds to read every slide whole (picks None) or the picked rows of each, per format, cold cache."""
    seconds = {}
    for name in (*COMPRESSIONS, "h5"):
        drop_page_cache()
        t0 = time.perf_counter()
        if name == "h5":
            for i, sid in enumerate(ids):
                with h5py.File(work / "h5" / f"{sid}.h5", "r") as f:
                    f["features"][...] if picks is None else f["features"][picks[i]]
        else:
            store = EmbeddingStore.open(str(work / f"zarr-{name}"))
            for i, sid in enumerate(ids):
                store.slide(sid).embeddings(None if picks is None else picks[i])
        seconds[name] = time.perf_counter() - t0
    return seconds


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
        print(f"{args.slides} slides, {sum(sizes):,} tiles of {args.dim}-d (seed {args.seed}) in {work}")
        write_s = write_all(cohort, sizes, work)
        whole_s = read_all(work, ids, None)
        picks = [np.sort(rng.choice(n, min(RANDOM_ROWS, n), replace=False)) for n in sizes]
        random_s = read_all(work, ids, picks)
        nbytes = {c: folder_bytes(work / f"zarr-{c}") for c in COMPRESSIONS} | {"h5": folder_bytes(work / "h5")}
        cache_dropped = drop_page_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tiles = sum(sizes)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "slides": args.slides, "tiles": tiles, "dim": args.dim, "page_cache_dropped_before_reads": cache_dropped,
        "bytes_per_tile": {k: v / tiles for k, v in nbytes.items()},
        "whole_read_tiles_per_s": {k: tiles / v for k, v in whole_s.items()},
        "random512_ms_per_slide": {k: 1e3 * v / args.slides for k, v in random_s.items()},
        "write_tiles_per_s": {k: tiles / v for k, v in write_s.items()},
        "ratios_zarr_over_h5": {c: {"bytes": nbytes[c] / nbytes["h5"], "whole_read_throughput": whole_s["h5"] / whole_s[c],
                                    "random512_speed": random_s["h5"] / random_s[c]} for c in COMPRESSIONS},
        "versions": provenance()["packages"],
    }
    print(f"{'':30}" + "".join(f"{'zarr ' + c:>13}" for c in COMPRESSIONS) + f"{'h5 fp32':>13}")
    for label, key, fmt in (("bytes per tile", "bytes_per_tile", "{:>13,.0f}"),
                            ("whole-slide read, tiles/s", "whole_read_tiles_per_s", "{:>13,.0f}"),
                            ("512 sorted rows, ms/slide", "random512_ms_per_slide", "{:>13,.1f}"),
                            ("write, tiles/s", "write_tiles_per_s", "{:>13,.0f}")):
        print(f"{label:30}" + "".join(fmt.format(result[key][k]) for k in (*COMPRESSIONS, "h5")))
    print("\nratios zarr/h5          bytes (target <= 0.5)   whole-read throughput (target >= 1.0)   512-row speed (reported)")
    for c, r in result["ratios_zarr_over_h5"].items():
        print(f"  zarr {c:<18}{r['bytes']:>10.3f}{r['whole_read_throughput']:>30.2f}{r['random512_speed']:>30.2f}")
    print(f"page cache dropped before each read phase: {cache_dropped}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
