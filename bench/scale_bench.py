"""What coordinating an extraction costs, without the encoding: the real driver (extract.job.Extraction on
Ray) and the real writers into a real zarr store, with encoder actors replaced by stand-ins that return
embeddings of the real width (2560, Virchow-2) at once and readers by stand-ins that return tiles from
memory. 200 tiles per slide, the GPU chunking (read chunk and batch 256).

Each cohort size runs in a fresh driver process (`--child`), so its RSS is its own. Measured per run: CPU
seconds of the driver, the GCS and the raylet (what coordinates), of Ray's other services, and of the
stand-in workers (readers, encoder actors and their writers); sustained tiles/s through the system; the
driver's RSS after the run. Printed: coordination CPU per 1,000 tiles and per slide, the driver's RSS growth
per slide fitted from the two sizes, and a projection for TCGA on 8, 64 and 128 H200s.

Then the driver's own ceiling: its bookkeeping for 100,000 stand-in slides of TCGA's mean size (12,800 tiles)
on an executor whose every task and call is answered at once, in this process (no Ray, no reading, no
encoding, no writing): slides/s and tiles/s one driver can hand out, and its memory per slide.

    python bench/scale_bench.py [--sizes 1000,10000] [--chunk-run 100x2560] [--encoders 2]
                                [--ceiling-slides 100000] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TILES_PER_SLIDE = 200
WIDTH = 2560  # Virchow-2's class ‖ mean-patch embedding
TCGA_SLIDES, TCGA_TILES = 11_700, 1.5e8  # diagnostic slides at 20x (the figures)
H200_TILES_PER_S = 1_164  # virchow2 bf16, batch 256, one H200 (bench/RESULTS.md)
H200_COMPILED_TILES_PER_S = 1_325  # the same, torch.compile (bench/RESULTS.md)
PIPELINE_EFFICIENCY = 0.9  # the pipeline ÷ the encoder alone that bench/gpu_pipeline.sh targets


# ---- stand-ins (pickled by value into Ray's workers) ------------------------------------------


class StandInEncoder:
    """Returns the same rows of real width for every call: no arithmetic, so the driver and writers are
    what is left to measure. Random values, so the store's compressor does its real work."""

    device = "cpu"
    token_shape = None

    def __init__(self) -> None:
        self.rows = np.random.default_rng(0).standard_normal((1024, WIDTH)).astype(np.float16)

    def describe(self) -> dict[str, Any]:
        return {"name": "stand-in", "weights_id": "none", "weights_sha256": None, "pooling": "none",
                "preprocessing": {}, "dim": WIDTH, "dtype": "float16", "compute_precision": "none"}

    def __call__(self, tiles: np.ndarray) -> tuple[np.ndarray, None]:
        return self.rows[: len(tiles)], None


def _stand_in_worker_class() -> type:
    from extract.encoder_worker import EncoderWorker

    class StandInWorker(EncoderWorker):  # the real writers, no model
        @staticmethod
        def _build_encoder(config: Any, device: str | None) -> StandInEncoder:
            return StandInEncoder()

    return StandInWorker


def _stand_in_stages(template: Any, tile_px: int, tiles_per_slide: int) -> tuple[Any, Any]:
    n = tiles_per_slide
    coords = np.stack([np.arange(n) % 64, np.arange(n) // 64], 1).astype(np.int64) * 224

    def prepare(entry: Any, cfg: Any) -> Any:
        return dataclasses.replace(template, entry=entry, coords=coords, tissue=np.ones(n, np.float32),
                                   empty_reason=None)

    def read(reader: str, path: str, plan: Any, chunk: np.ndarray) -> np.ndarray:
        return np.zeros((len(chunk), tile_px, tile_px, 3), np.uint8)  # from memory: nothing decoded

    return prepare, read


# ---- one run (a child process) ----------------------------------------------------------------


def _process_cpu(ps: Any) -> dict[str, float]:
    """CPU seconds (user + system) of this driver and of every Ray process below it, by role."""
    me = ps.Process()
    roles = {"driver": me.cpu_times().user + me.cpu_times().system, "gcs": 0.0, "raylet": 0.0,
             "ray_services": 0.0, "workers": 0.0}
    for child in me.children(recursive=True):
        try:
            name, cmdline, times = child.name(), " ".join(child.cmdline()), child.cpu_times()
        except ps.Error:
            continue
        role = ("gcs" if "gcs_server" in name else "raylet" if "raylet" in name
                else "workers" if ("default_worker" in cmdline or name.startswith("ray::")) else "ray_services")
        roles[role] += times.user + times.system
    return roles


def child(n_slides: int, encoders: int, tile_px: int, work: Path, tiles_per_slide: int = TILES_PER_SLIDE) -> dict[str, Any]:
    import psutil
    import ray

    from demo.slides import synthetic_he, write_pyramid
    from extract.config import ExtractConfig
    from extract.job import Extraction
    from extract.ray_executor import RayExecutor
    from extract.slide_prep import prepare_slide
    from extract.summary import SlideStatus
    from slidecache.cohorts.slides import SlideEntry

    cfg = ExtractConfig(encoder="virchow2-tiny", batch_size=256, read_chunk=256, num_encoders=encoders)
    template_path = write_pyramid(work / "template.tiff", synthetic_he(1400, 1400, seed=0), mpp=0.5)
    template = prepare_slide(SlideEntry("template", str(template_path), "template"), cfg)
    prepare, read = _stand_in_stages(template, tile_px, tiles_per_slide)
    entries = [SlideEntry(f"s{i:06d}", str(template_path), f"p{i:06d}") for i in range(n_slides)]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", object_store_memory=cfg.object_store_memory, include_dashboard=False,
             log_to_driver=False)
    try:
        executor = RayExecutor(cfg, worker=_stand_in_worker_class(), prepare=prepare, read=read)
        warm = Extraction(entries[:20], [(str(work / "warm.zarr"), cfg)], log=lambda m: None, executor=executor)
        warm.run()  # worker processes started, functions exported: what a long run pays once
        rss0, uss0 = psutil.Process().memory_info().rss, psutil.Process().memory_full_info().uss
        cpu0, t0 = _process_cpu(psutil), time.perf_counter()
        summary = Extraction(entries, [(str(work / "store.zarr"), cfg)], log=lambda m: None, executor=executor).run()
        wall = time.perf_counter() - t0
        cpu1 = _process_cpu(psutil)
        rss1, uss1 = psutil.Process().memory_info().rss, psutil.Process().memory_full_info().uss
    finally:
        ray.shutdown()
    if summary.count(SlideStatus.DONE) != n_slides:
        raise SystemExit(f"only {summary.count(SlideStatus.DONE)} of {n_slides} slides completed: {summary.failed[:3]}")
    cpu = {role: cpu1[role] - cpu0[role] for role in cpu0}
    return {"slides": n_slides, "tiles": summary.tiles, "seconds": wall, "tiles_per_s": summary.tiles / wall,
            "cpu_s": cpu, "coordination_cpu_s": cpu["driver"] + cpu["gcs"] + cpu["raylet"],
            "tiles_per_slide": tiles_per_slide, "driver_rss_before": rss0, "driver_rss_after": rss1, "driver_uss_before": uss0, "driver_uss_after": uss1, "encoders": encoders, "tile_px": tile_px,
            "store_bytes": sum(f.stat().st_size for f in (work / "store.zarr").rglob("*") if f.is_file())}


# ---- the driver's own ceiling: an executor that answers everything at once, in this process --------------


CEILING_TILES_PER_SLIDE = 12_800  # TCGA's mean: 1.5e8 tiles / 11,700 slides


class _Answered:
    """A task or call already answered."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class InstantExecutor:
    """The Executor seam with nothing behind it: a prepare answers a plan of `tiles` tiles, a read nothing, an
    encoder's slide call the answer a worker would give. What is left is the driver's bookkeeping."""

    name = "local"  # as the store records it (no real executor runs)

    def __init__(self, template: Any, tiles: int, encoders: int) -> None:
        self._template = template
        self._coords = np.zeros((tiles, 2), np.int64)
        self._tissue = np.ones(tiles, np.float32)
        self._encoders = encoders

    def resources(self) -> Any:
        from extract.stages import Resources

        return Resources(self._encoders, 16 * self._encoders, [f"node{i}" for i in range(self._encoders)])

    def gpus(self) -> int:
        return self._encoders

    def start_encoders(self, worker_args: tuple[Any, ...], count: int, gpus: int, nodes: list[str]) -> list[Any]:
        return [f"node{i}" for i in range(count)]

    def prepare(self, entry: Any, cfg: Any) -> _Answered:
        return _Answered(dataclasses.replace(self._template, entry=entry, coords=self._coords, tissue=self._tissue,
                                             empty_reason=None, pictures=(None, None)))

    def read(self, prepared: Any, start: int, stop: int, near: str | None) -> _Answered:
        return _Answered(None)

    def call(self, actor: str, method: str, *args: Any) -> _Answered:
        from extract.encoder_worker import SlideAnswer, StoreAnswer

        if method == "describe":
            return _Answered({"encoders": [StandInEncoder.describe(None)], "token_shapes": [None],  # type: ignore[arg-type]
                              "device": "cuda", "pid": 0, "threads": 1, "node": actor})
        job = args[0]
        rows = job.prepared.n_tiles
        return _Answered(SlideAnswer({i: StoreAnswer("done", rows) for i in job.stores}, actor,
                                     [actor] * -(-rows // job.read_chunk), 0.0))

    def wait(self, refs: Any, timeout: float) -> list[Any]:
        return list(refs)

    def get(self, ref: _Answered) -> Any:
        return ref.value

    def done(self, ref: _Answered) -> bool:
        return True

    def succeeded(self, ref: _Answered) -> bool:
        return True

    def actor_died(self, error: BaseException) -> bool:
        return False


def ceiling_child(n_slides: int, tiles: int, encoders: int, work: Path) -> dict[str, Any]:
    import psutil

    from demo.slides import synthetic_he, write_pyramid
    from extract.config import ExtractConfig
    from extract.job import Extraction
    from extract.slide_prep import prepare_slide
    from extract.summary import SlideStatus
    from slidecache.cohorts.slides import SlideEntry

    cfg = ExtractConfig(encoder="virchow2-tiny", batch_size=256, read_chunk=256)
    template_path = write_pyramid(work / "template.tiff", synthetic_he(1400, 1400, seed=0), mpp=0.5)
    template = dataclasses.replace(prepare_slide(SlideEntry("template", str(template_path), "template"), cfg),
                                   thumbnail=None, mask=None)
    entries = [SlideEntry(f"TCGA-XX-{i:06d}-01Z-00-DX1", f"/slides/TCGA-XX-{i:06d}-01Z-00-DX1.svs", f"TCGA-XX-{i:06d}")
               for i in range(n_slides)]
    executor = InstantExecutor(template, tiles, encoders)
    process = psutil.Process()
    uss0, cpu0, t0 = process.memory_full_info().uss, process.cpu_times(), time.perf_counter()
    summary = Extraction(entries, [(str(work / "store.zarr"), cfg)], log=lambda m: None, executor=executor).run()
    wall = time.perf_counter() - t0
    cpu1, uss1 = process.cpu_times(), process.memory_full_info().uss
    if summary.count(SlideStatus.DONE) != n_slides:
        raise SystemExit(f"only {summary.count(SlideStatus.DONE)} of {n_slides} stand-in slides completed")
    cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    return {"slides": n_slides, "tiles_per_slide": tiles, "encoders": encoders, "seconds": wall, "driver_cpu_s": cpu,
            "slides_per_s": n_slides / wall, "tiles_per_s": summary.tiles / wall,
            "driver_ms_per_slide": 1e3 * cpu / n_slides, "driver_private_growth_bytes_per_slide": (uss1 - uss0) / n_slides}


def _run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ceiling_", dir=args.work))
    try:
        out = subprocess.run([sys.executable, __file__, "--ceiling-child", str(args.ceiling_slides), "--encoders",
                              str(args.ceiling_encoders), "--work", str(work)], capture_output=True, text=True,
                             check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode:
        raise SystemExit(f"the ceiling run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_ceiling(r: dict[str, Any]) -> None:
    print(f"\nthe driver's own ceiling: {r['slides']} stand-in slides of {r['tiles_per_slide']} tiles on "
          f"{r['encoders']} instant encoders: {r['seconds']:.1f} s, {r['slides_per_s']:.0f} slides/s = "
          f"{r['tiles_per_s']:,.0f} tiles/s (target ≥ 100,000) = {r['tiles_per_s'] / H200_TILES_PER_S:,.0f} H200s; "
          f"driver {r['driver_ms_per_slide']:.2f} ms CPU per slide, private memory "
          f"{r['driver_private_growth_bytes_per_slide']:.0f} B per slide (target ≤ 2 KB)")


# ---- the parent: runs, fit, projection --------------------------------------------------------


CHUNK = 256  # tiles per read chunk and per encode call (the GPU default)


def projection(roles: dict[str, tuple[float, float]], rss_per_slide: float, rss_base: float) -> list[dict[str, Any]]:
    """A TCGA-scale run on n H200s: the wall at the measured eager bf16 rate and at the compiled rate × the
    pipeline's target efficiency; the head node's coordination CPU (driver and GCS: what one cluster shares) and
    the raylets' (spread over the GPU nodes, each for its own reads); how many tiles/s one head coordinates; the
    driver's memory; from the costs per slide and per read chunk fitted for each role."""
    slide_tiles = TCGA_TILES / TCGA_SLIDES
    chunks = slide_tiles / CHUNK

    def per_slide(*names: str) -> float:
        return sum(roles[name][0] + chunks * roles[name][1] for name in names)

    head, raylets = per_slide("driver", "gcs"), per_slide("raylet")
    rows = []
    for gpus in (8, 64, 128):
        wall = TCGA_TILES / (gpus * H200_TILES_PER_S)
        compiled = TCGA_TILES / (gpus * H200_COMPILED_TILES_PER_S * PIPELINE_EFFICIENCY)
        rows.append({"gpus": gpus, "wall_h": wall / 3600, "wall_compiled_pipeline_h": compiled / 3600,
                     "head_cpu_h": TCGA_SLIDES * head / 3600, "head_cores_busy": TCGA_SLIDES * head / wall,
                     "raylets_cpu_h": TCGA_SLIDES * raylets / 3600,
                     "raylet_cores_busy_per_gpu": TCGA_SLIDES * raylets / wall / gpus,
                     "coordination_limit_tiles_per_s": slide_tiles / head,
                     "gpus_one_driver_feeds": slide_tiles / head / H200_TILES_PER_S,
                     "driver_rss_mb": (rss_base + TCGA_SLIDES * rss_per_slide) / 2**20})
    return rows


def _cpu(run: dict[str, Any], role: str | None) -> float:
    return run["coordination_cpu_s"] if role is None else run["cpu_s"][role]


def fit(one_chunk: dict[str, Any], many_chunks: dict[str, Any], role: str | None = None) -> tuple[float, float]:
    """Coordination CPU (or one role's) = a per slide + b per chunk, from two runs whose slides have 1 and k
    chunks."""
    k1 = -(-one_chunk["tiles_per_slide"] // CHUNK)
    k2 = -(-many_chunks["tiles_per_slide"] // CHUNK)
    c1 = _cpu(one_chunk, role) / one_chunk["slides"]
    c2 = _cpu(many_chunks, role) / many_chunks["slides"]
    per_chunk = (c2 - c1) / (k2 - k1)
    return c1 - per_chunk * k1, per_chunk


def _run_child(n: int, tiles_per_slide: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"scale{n}_", dir=args.work))
    try:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--tiles-per-slide", str(tiles_per_slide),
                              "--encoders", str(args.encoders), "--tile-px", str(args.tile_px), "--work", str(work)],
                             capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode:
        raise SystemExit(f"the run of {n} slides failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[scale] {n} slides x {tiles_per_slide} tiles: {r['tiles']} tiles in {r['seconds']:.1f} s "
          f"({r['tiles_per_s']:.0f} tiles/s); CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s"].items())
          + f"; driver RSS {r['driver_rss_after'] / 2**20:.0f} MB, private {r['driver_uss_after'] / 2**20:.0f} MB",
          flush=True)
    return r


def _growth(run: dict[str, Any]) -> float:
    return run["driver_uss_after"] - run["driver_uss_before"]  # private memory the run added to the driver


def summarise(runs: list[dict[str, Any]], chunky: dict[str, Any]) -> dict[str, Any]:
    print(f"\n{'slides':>7} {'tiles':>6} {'tiles/s':>8} {'coord ms/slide':>15} {'coord ms/1k tiles':>18} {'driver s':>9} "
          f"{'gcs s':>6} {'raylet s':>9} {'workers s':>10} {'+private MB':>12}")
    for r in [*runs, chunky]:
        c = r["coordination_cpu_s"]
        print(f"{r['slides']:>7} {r['tiles_per_slide']:>6} {r['tiles_per_s']:>8.0f} {1e3 * c / r['slides']:>15.2f} "
              f"{1e6 * c / r['tiles']:>18.2f} {r['cpu_s']['driver']:>9.1f} {r['cpu_s']['gcs']:>6.1f} "
              f"{r['cpu_s']['raylet']:>9.1f} {r['cpu_s']['workers']:>10.1f} {_growth(r) / 2**20:>12.1f}")
    per_slide, per_chunk = fit(runs[-1], chunky)
    roles = {role: fit(runs[-1], chunky, role) for role in ("driver", "gcs", "raylet")}
    a, b = runs[0], runs[-1]
    slope = (_growth(b) - _growth(a)) / max(b["slides"] - a["slides"], 1)
    proj = projection(roles, max(slope, 0.0), b["driver_uss_before"] + _growth(a))
    print(f"\nfitted: coordination {1e3 * per_slide:.2f} ms per slide + {1e3 * per_chunk:.2f} ms per chunk of {CHUNK} "
          f"tiles = {1e6 * per_chunk / CHUNK:.2f} ms per 1,000 tiles (targets ≤ 20 and ≤ 5); the driver's private "
          f"memory grows {slope:.0f} B per slide (fitted from {a['slides']} and {b['slides']} slides; target ≤ 2 KB)")
    print("by role: " + "; ".join(f"{role} {1e3 * a:.2f} ms per slide + {1e6 * b / CHUNK:.2f} ms per 1,000 tiles"
                                  for role, (a, b) in roles.items()))
    for row in proj:
        print(f"TCGA ({TCGA_SLIDES} slides, {TCGA_TILES:.1e} tiles) on {row['gpus']} H200s: "
              f"{row['wall_h'] * 60:.1f} min encoder-bound at {H200_TILES_PER_S} tiles/s per GPU, "
              f"{row['wall_compiled_pipeline_h'] * 60:.1f} min compiled ({H200_COMPILED_TILES_PER_S} × pipeline "
              f"{PIPELINE_EFFICIENCY}); head node (driver + GCS) {row['head_cpu_h'] * 60:.1f} CPU-min = "
              f"{row['head_cores_busy']:.3f} of one core; raylets {row['raylets_cpu_h'] * 60:.1f} CPU-min = "
              f"{row['raylet_cores_busy_per_gpu']:.3f} of a core per GPU, on its own node; one driver coordinates "
              f"up to {row['coordination_limit_tiles_per_s']:,.0f} tiles/s = {row['gpus_one_driver_feeds']:.0f} "
              f"H200s; driver ~{row['driver_rss_mb']:.0f} MB private")
    return {"runs": runs, "chunk_run": chunky, "coordination_ms_per_slide": 1e3 * per_slide,
            "coordination_ms_per_1k_tiles": 1e6 * per_chunk / CHUNK, "coordination_ms_per_chunk": 1e3 * per_chunk,
            "driver_private_growth_bytes_per_slide": slope, "tcga_projection": proj,
            "by_role": {role: {"ms_per_slide": 1e3 * a, "ms_per_1k_tiles": 1e6 * b / CHUNK}
                        for role, (a, b) in roles.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="cohort sizes of 200-tile slides (two: the RSS fit)")
    p.add_argument("--chunk-run", default="100x2560", help="SLIDESxTILES: the run of many-chunk slides for the "
                                                             "per-chunk cost")
    p.add_argument("--encoders", type=int, default=2, help="stand-in encoder actors (each with its writers)")
    p.add_argument("--tile-px", type=int, default=224, help="side of the stand-in tiles the readers return")
    p.add_argument("--ceiling-slides", type=int, default=100_000,
                   help="stand-in slides for the driver's own ceiling (0: skip)")
    p.add_argument("--ceiling-encoders", type=int, default=128, help="instant encoders for the ceiling run")
    p.add_argument("--work", type=Path, help="default: a temporary folder, removed after")
    p.add_argument("--json", type=Path)
    p.add_argument("--summarise", type=Path, help="print the figures of a saved --json again, without running")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ceiling-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tiles-per-slide", type=int, default=TILES_PER_SLIDE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.encoders, args.tile_px, args.work, args.tiles_per_slide)))
        return 0
    if args.ceiling_child:
        print(json.dumps(ceiling_child(args.ceiling_child, CEILING_TILES_PER_SLIDE, args.encoders, args.work)))
        return 0
    if args.summarise:
        saved = json.loads(args.summarise.read_text())
        runs, chunky, ceiling = saved["runs"], saved["chunk_run"], saved.get("ceiling")
    else:
        runs = [_run_child(int(n), TILES_PER_SLIDE, args) for n in args.sizes.split(",")]
        slides, tiles = (int(v) for v in args.chunk_run.split("x"))
        chunky = _run_child(slides, tiles, args)
        ceiling = _run_ceiling(args) if args.ceiling_slides else None
    result = summarise(runs, chunky)
    if ceiling is not None:
        print_ceiling(ceiling)
        result["ceiling"] = ceiling
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
