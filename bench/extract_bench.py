"""Extraction throughput and memory, each measured side by side in one run on synthetic JPEG slides.

1. pipeline: end-to-end tiles/s of the Ray job divided by tiles/s of the same encoder alone on
   pre-decoded tiles (same batch, every core: as the encoder actor runs, readers beside it). Target >= 0.9 with
   an encoder heavy enough to dominate (virchow2-small on CPU; virchow2-random on a GPU).
2. reading: the CPU path alone (open, thumbnail + tissue mask, read region, JPEG decode, resample
   448 -> 224 px, i.e. 0.25 -> 0.5 µm/px) in tiles/s on one core, per reader. Target >= 150 tiles/s.
3. memory: peak PSS summed over the driver and every Ray process for a 10k- and a 100k-tile slide with
   virchow2-tiny. Target: the larger within 10% of the smaller.

    python bench/extract_bench.py [--pipeline-tiles 240] [--rss-tiles 10000,100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.slides import write_repeated_slide  # noqa: E402
from extract.config import ExtractConfig  # noqa: E402
from extract.readers import READERS  # noqa: E402
from extract.slide_prep import prepare_slide, read_tiles  # noqa: E402
from slidecache.cohorts.slides import SlideEntry  # noqa: E402
from slidecache.provenance import provenance  # noqa: E402


def slide_for_tiles(path: Path, n_tiles: int, mpp: float, seed: int = 0) -> Path:
    """A square all-tissue slide holding about n_tiles tiles of 224 px at 0.5 µm/px."""
    side_tiles = math.ceil(math.sqrt(n_tiles))
    side_px = int(math.ceil(side_tiles * 224 * 0.5 / mpp / 256) * 256)
    return write_repeated_slide(path, side_px, side_px, mpp, seed=seed, reduced=(4, 16, 64))


def bench_reading(work: Path, tiles: int) -> dict[str, dict[str, float]]:
    path = slide_for_tiles(work / "read.tiff", tiles, mpp=0.25)
    out = {}
    for name in READERS:
        cfg = ExtractConfig(encoder="virchow2-tiny", readers=(name,))
        t0 = time.perf_counter()
        prepared = prepare_slide(SlideEntry("read", str(path), "read"), cfg)
        t1 = time.perf_counter()
        read_tiles(prepared.reader, str(path), prepared.plan, prepared.coords)
        t2 = time.perf_counter()
        n = prepared.n_tiles
        out[name] = {"tiles": n, "level": prepared.plan.level, "resized": prepared.plan.needs_resize,
                     "tiles_per_s_with_open": n / (t2 - t0), "tiles_per_s_read_only": n / (t2 - t1)}
    return out


def bench_pipeline(work: Path, tiles: int) -> dict[str, float]:
    import ray
    import torch

    from extract.inference import BatchEncoder
    from extract.job import Extraction

    slides = [slide_for_tiles(work / "cohort" / f"p{i}.tiff", tiles // 3, mpp=0.25, seed=i) for i in range(3)]
    cfg = ExtractConfig(encoder="virchow2-small", precision="fp32").for_device("cpu")  # the CPU defaults
    entries = [SlideEntry(p.stem, str(p), p.stem) for p in slides]
    # The encoder alone, on tiles decoded beforehand, at its best thread count: every core, as the actor runs.
    encoder = BatchEncoder(cfg)
    print(f"encoder alone: {torch.get_num_threads()} threads, batch {cfg.batch_size}", flush=True)
    decoded = []
    for entry in entries:
        prepared = prepare_slide(entry, cfg)
        decoded.append(read_tiles(prepared.reader, entry.path, prepared.plan, prepared.coords))
    encoder(decoded[0][:cfg.batch_size])  # warm-up
    t0 = time.perf_counter()
    n_alone = sum(len(encoder(tiles_)[0]) for tiles_ in decoded)
    alone = n_alone / (time.perf_counter() - t0)
    del encoder
    ray.init(num_cpus=2, object_store_memory=500 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        summary = Extraction(entries, [(str(work / "pipeline.zarr"), cfg)], log=lambda m: None).run()
    finally:
        ray.shutdown()
    pipeline = summary.tiles / summary.pipeline_seconds
    return {"encoder": cfg.encoder, "tiles": summary.tiles, "encoder_alone_tiles_per_s": alone,
            "pipeline_tiles_per_s": pipeline, "ratio": pipeline / alone}


class PeakPss:
    """Peak of PSS summed over this process and all its descendants (Ray's raylet, workers, actors)."""

    def __init__(self, every_s: float = 0.5) -> None:
        import psutil

        self.root, self.every, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_memory(work: Path, sizes: list[int]) -> dict[str, dict[str, float]]:
    import ray

    from extract.job import Extraction

    out = {}
    for n in sizes:
        path = slide_for_tiles(work / f"rss{n}.tiff", n, mpp=0.5)
        cfg = ExtractConfig(encoder="virchow2-tiny", precision="fp32", batch_size=64, read_chunk=256)
        ray.init(num_cpus=2, object_store_memory=500 * 1024**2, include_dashboard=False, log_to_driver=False)
        try:
            with PeakPss() as meter:
                summary = Extraction([SlideEntry(f"rss{n}", str(path), "p")], [(str(work / f"rss{n}.zarr"), cfg)],
                                     log=lambda m: None).run()
        finally:
            ray.shutdown()
        out[str(n)] = {"tiles": summary.tiles, "peak_pss_mib": meter.peak / 2**20,
                       "tiles_per_s": summary.tiles / summary.pipeline_seconds}
        shutil.rmtree(work / f"rss{n}.zarr", ignore_errors=True)
        path.unlink()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-tiles", type=int, default=600)
    parser.add_argument("--read-tiles", type=int, default=2000)
    parser.add_argument("--rss-tiles", default="10000,100000")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: reading,pipeline,memory")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"}
    try:
        if "reading" not in skip:
            result["reading"] = bench_reading(work, args.read_tiles)
            print("\nreading path, one core, JPEG pyramid at 0.25 µm/px -> 224 px at 0.5 (target >= 150 tiles/s):")
            for name, r in result["reading"].items():
                print(f"  {name:<10} {r['tiles_per_s_with_open']:8.0f} tiles/s incl. open+mask   "
                      f"{r['tiles_per_s_read_only']:8.0f} read only   ({r['tiles']} tiles, level {r['level']}, resized {r['resized']})")
        if "pipeline" not in skip:
            p = result["pipeline"] = bench_pipeline(work, args.pipeline_tiles)
            print(f"\npipeline vs encoder alone ({p['encoder']}, {p['tiles']} tiles, target >= 0.9): "
                  f"{p['pipeline_tiles_per_s']:.2f} / {p['encoder_alone_tiles_per_s']:.2f} tiles/s = {p['ratio']:.2f}")
        if "memory" not in skip:
            sizes = [int(s) for s in args.rss_tiles.split(",")]
            m = result["memory"] = bench_memory(work, sizes)
            print("\npeak PSS, driver + all Ray processes, virchow2-tiny (target: within 10%):")
            for r in m.values():
                print(f"  {r['tiles']:>7} tiles: {r['peak_pss_mib']:8.0f} MiB   ({r['tiles_per_s']:.0f} tiles/s)")
            values = [r["peak_pss_mib"] for r in m.values()]
            if len(values) > 1:
                result["memory_ratio_largest_over_smallest"] = values[-1] / values[0]
                print(f"  ratio largest/smallest: {values[-1] / values[0]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["versions"] = provenance()["packages"]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
