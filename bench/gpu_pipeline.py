"""The whole extraction on one machine, beside its two halves, in one run: pipeline ÷ encoder alone and
pipeline ÷ reading alone. Run it through `bash bench/gpu_pipeline.sh` (which brings what the GPU machine
lacks); `--device cpu` is the dry run that exercises every step here.

1. A synthetic cohort of JPEG-pyramid TIFFs, all tissue (demo.slides.write_repeated_slide), written in parallel.
2. Reading alone: every slide planned and every tile read by the executor's reader processes, discarded.
3. Encoder alone: the extraction's own encoder call (`BatchEncoder(tiles)`: uint8 host tiles in, fp16
   host embeddings out, the same batch and chunk, compiled when the pipeline is) on tiles in memory.
4. The pipeline: `Extraction` on the single-node executor (no Ray: the GPU machine has none) into a zarr
   store, timed from the encoder being ready (model built, compiled) to the last commit.

Printed: tiles/s of each, the two ratios, the encoder's busy fraction during the pipeline, the reader cores
it used (their CPU seconds ÷ wall) and tiles/s per reader core. Seeds fixed (slides: 100 + i).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo.slides import write_repeated_slide  # noqa: E402
from extract.config import ExtractConfig  # noqa: E402
from extract.job import Extraction  # noqa: E402
from extract.local_executor import LocalExecutor  # noqa: E402
from extract.summary import SlideStatus  # noqa: E402
from slidecache.cohorts.slides import SlideEntry  # noqa: E402
from slidecache.devices import usable_cores  # noqa: E402

DEFAULTS = {  # per device: a cohort the run can finish within its time (GPU: 6 minutes with set-up)
    "cuda": {"encoder": "virchow2-random", "slides": 20, "side": 23_000, "read_alone_slides": 4},
    "cpu": {"encoder": "virchow2-tiny", "slides": 3, "side": 4_600, "read_alone_slides": 3},
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--encoder", help="registry name (default: virchow2-random on cuda, virchow2-tiny on cpu)")
    p.add_argument("--slides", type=int, help="cohort size (default 20 on cuda)")
    p.add_argument("--side", type=int, help="level-0 side in px at 0.5 µm/px (default 23000: ~10,400 tiles a slide)")
    p.add_argument("--read-alone-slides", type=int, help="slides the reading-alone pass reads (its rate is per tile)")
    p.add_argument("--batch-size", type=int, help="default: the extraction's default for the device")
    p.add_argument("--read-chunk", type=int, help="default: the extraction's default for the device")
    p.add_argument("--no-compile", action="store_true", help="eager encoder in both the pipeline and alone")
    p.add_argument("--encoder-seconds", type=float, default=20.0, help="how long the encoder-alone pass runs")
    p.add_argument("--work", type=Path, default=Path("/tmp/slidecache_gpu_pipeline"))
    p.add_argument("--keep-slides", action="store_true", help="reuse slides already in --work")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _write_slide(path: str, side: int, seed: int) -> str:
    write_repeated_slide(path, side, side, mpp=0.5, seed=seed)
    return path


def make_cohort(folder: Path, n: int, side: int, keep: bool) -> tuple[list[SlideEntry], float]:
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"slide{i:02d}_{side}.tiff" for i in range(n)]
    todo = [p for p in paths if not (keep and p.exists())]
    with ProcessPoolExecutor(max_workers=min(len(todo), usable_cores()) or 1) as pool:
        list(pool.map(_write_slide, [str(p) for p in todo], [side] * len(todo), [100 + paths.index(p) for p in todo]))
    return [SlideEntry(p.stem, str(p), p.stem) for p in paths], time.perf_counter() - started


def reading_alone(executor: LocalExecutor, entries: list[SlideEntry], cfg: ExtractConfig) -> dict[str, float]:
    """Plan and read every tile with the pipeline's readers and chunking, keeping as many reads in flight
    as the pipeline does per encoder; nothing encoded, nothing written."""
    cpu0, started = executor.reader_cpu_seconds(), time.perf_counter()
    prepared = [executor.get(ref) for ref in [executor.prepare(e, cfg) for e in entries]]  # in parallel
    inflight: list[Any] = []
    tiles = 0
    for p in prepared:
        for start in range(0, p.n_tiles, cfg.read_chunk):
            inflight.append(executor.read(p, start, min(start + cfg.read_chunk, p.n_tiles), None))
            while len(inflight) >= 2 * usable_cores():
                tiles += len(executor.get(inflight.pop(0)))
    tiles += sum(len(executor.get(ref)) for ref in inflight)
    wall = time.perf_counter() - started
    cpu = executor.reader_cpu_seconds() - cpu0
    return {"tiles": tiles, "seconds": wall, "tiles_per_s": tiles / wall, "reader_cores": cpu / wall}


def encoder_alone(cfg: ExtractConfig, device: str, seconds: float) -> dict[str, float]:
    """The extraction's encoder call on host uint8 tiles of the pipeline's chunk size, for about `seconds`."""
    import torch

    from extract.inference import BatchEncoder

    encoder = BatchEncoder(cfg, torch.device(device))  # compiles (and warms) here when cfg.compile
    h, w = encoder.input_size
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (cfg.read_chunk, h, w, 3), dtype=np.uint8) for _ in range(3)]
    encoder(chunks[0])  # warm-up
    tiles, calls, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 3:
        encoder(chunks[calls % 3])
        tiles, calls = tiles + cfg.read_chunk, calls + 1
    wall = time.perf_counter() - started
    del encoder
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tiles": tiles, "seconds": wall, "tiles_per_s": tiles / wall}


def pipeline(executor: LocalExecutor, entries: list[SlideEntry], cfg: ExtractConfig, store: Path) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    extraction = Extraction(entries, [(str(store), cfg)], log=lambda m: print(m, flush=True), executor=executor)
    cpu0 = executor.reader_cpu_seconds()
    summary = extraction.run()
    cpu = executor.reader_cpu_seconds() - cpu0
    stats = [executor.get(executor.call(actor, "stats")) for actor in extraction.actors]
    wall = summary.pipeline_seconds
    busy = sum(s["busy_s"] for s in stats) / len(stats)
    failed = [o.slide_id for o in summary.outcomes if o.status != SlideStatus.DONE]
    if failed:
        raise SystemExit(f"the pipeline did not complete every slide: {failed}")
    return {"tiles": summary.tiles, "seconds": wall, "seconds_with_model_load": summary.seconds,
            "tiles_per_s": summary.tiles / wall, "encoder_busy_fraction": busy / wall,
            # reader CPU over the whole run (prepare included) ÷ the pipeline's wall: an upper bound
            "reader_cores": cpu / wall}


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for the dry run")
    cfg = ExtractConfig(encoder=args.encoder, batch_size=args.batch_size, read_chunk=args.read_chunk,
                        compile=not args.no_compile, executor="local").for_device(args.device)
    machine = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"[gpu_pipeline] {machine}; {usable_cores()} cores; torch {torch.__version__}; {cfg.encoder}, batch "
          f"{cfg.batch_size}, read chunk {cfg.read_chunk}, compile {cfg.compile}", flush=True)
    entries, made_s = make_cohort(args.work / "slides", args.slides, args.side, args.keep_slides)
    print(f"[gpu_pipeline] cohort: {len(entries)} slides of {args.side} px ({made_s:.1f} s to write)", flush=True)

    executor = LocalExecutor(cfg)
    try:
        read = reading_alone(executor, entries[: args.read_alone_slides], cfg)
        print(f"[gpu_pipeline] reading alone: {read['tiles_per_s']:.0f} tiles/s on {read['reader_cores']:.1f} cores",
              flush=True)
        alone = encoder_alone(cfg, args.device, args.encoder_seconds)
        print(f"[gpu_pipeline] encoder alone: {alone['tiles_per_s']:.0f} tiles/s", flush=True)
        run = pipeline(executor, entries, cfg, args.work / "store.zarr")
    finally:
        executor.shutdown()
    result = {
        "machine": machine, "cores": usable_cores(), "torch": torch.__version__, "python": platform.python_version(),
        "config": cfg.to_dict(), "slides": len(entries), "side_px": args.side, "cohort_write_s": made_s,
        "reading_alone": read, "encoder_alone": alone, "pipeline": run,
        "pipeline_over_encoder": run["tiles_per_s"] / alone["tiles_per_s"],
        "pipeline_over_reading": run["tiles_per_s"] / read["tiles_per_s"],
        "tiles_per_s_per_reader_core": run["tiles_per_s"] / max(run["reader_cores"], 1e-9),
    }
    print(f"\n{'':<24}{'tiles/s':>10}\n{'reading alone':<24}{read['tiles_per_s']:>10.0f}\n"
          f"{'encoder alone':<24}{alone['tiles_per_s']:>10.0f}\n{'pipeline':<24}{run['tiles_per_s']:>10.0f}\n"
          f"pipeline ÷ encoder alone {result['pipeline_over_encoder']:.3f}; pipeline ÷ reading alone "
          f"{result['pipeline_over_reading']:.3f}; encoder busy {run['encoder_busy_fraction']:.1%} of the pipeline; "
          f"reader cores used {run['reader_cores']:.1f} of {usable_cores()}; "
          f"{result['tiles_per_s_per_reader_core']:.0f} tiles/s per reader core; {run['tiles']} tiles in "
          f"{run['seconds']:.1f} s ({run['seconds_with_model_load']:.1f} s with model load)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
