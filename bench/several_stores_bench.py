"""Several encoders from one read (issue 15): a cohort extracted for 3 encoders in one pass vs 3 separate runs,
side by side in one run on the same synthetic JPEG slides, on the local executor (what one machine without a
cluster runs). Two workloads:

1. read-bound: three tiny encoders (virchow2-tiny). Target: one pass <= 0.5x the sum of the separate runs.
2. encoder-bound: three ViT-S-size encoders (virchow2-small). Target: one pass <= 1.05x the sum of the separate
   runs' encode times (the encoders' busy seconds), i.e. the shared read costs nothing extra.

Each run is its own process (the peak RSS is its own). Printed per run: wall, tiles, reader tasks, encoder busy
seconds, peak RSS of the process (the encoders run on its threads) and the largest reader process; "loaded s" is
the run from the encoders being ready to the last commit (no process start or model build).

    python bench/several_stores_bench.py [--read-slides 6] [--read-tiles 300] [--encode-slides 2]
        [--encode-tiles 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.extract_bench import slide_for_tiles  # noqa: E402
from slidecache.provenance import provenance  # noqa: E402

STORES = 3


def one_run(encoders: list[str], cohort: list[str], work: Path) -> dict[str, float]:
    """One extraction (one store per encoder, one read) in this process; what it measured."""
    from extract.config import ExtractConfig
    from extract.job import Extraction
    from extract.local_executor import LocalExecutor
    from slidecache.cohorts.slides import SlideEntry

    entries = [SlideEntry(Path(p).stem, p, Path(p).stem) for p in cohort]
    configs = [ExtractConfig(encoder=name, precision="fp32", executor="local") for name in encoders]
    stores = [(str(work / f"store{i}.zarr"), cfg) for i, cfg in enumerate(configs)]
    executor = LocalExecutor(configs[0])
    try:
        t0 = time.perf_counter()
        extraction = Extraction(entries, stores, log=lambda m: None, executor=executor)
        summary = extraction.run()
        wall = time.perf_counter() - t0
        stats = [executor.get(executor.call(actor, "stats")) for actor in extraction.actors]
    finally:
        executor.shutdown()
    if summary.failed:
        raise SystemExit(f"slides failed: {summary.failed}")
    return {"wall_s": wall, "pipeline_s": summary.pipeline_seconds, "tiles": summary.tiles, "reader_tasks": sum(summary.chunk_reads.values()),
            "encode_busy_s": sum(s["busy_s"] for s in stats),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_reader_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def in_a_process(encoders: list[str], cohort: list[Path], work: Path) -> dict[str, float]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = json.dumps({"encoders": encoders, "cohort": [str(p) for p in cohort], "work": str(work)})
    done = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"run {encoders} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def workload(name: str, encoder: str, cohort: list[Path], work: Path) -> dict[str, object]:
    for path in cohort:  # the same page-cache state for every run: each file read once beforehand
        path.read_bytes()
    separate = [in_a_process([encoder], cohort, work / f"{name}-alone{i}") for i in range(STORES)]
    together = in_a_process([encoder] * STORES, cohort, work / f"{name}-together")
    summed = {key: sum(run[key] for run in separate) for key in ("wall_s", "tiles", "reader_tasks", "encode_busy_s")}
    out = {"encoder": encoder, "slides": len(cohort), "separate": separate, "one_pass": together,
           "one_pass_over_separate_wall": together["wall_s"] / summed["wall_s"],
           "one_pass_over_separate_encode": together["wall_s"] / summed["encode_busy_s"],
           "one_pass_pipeline_over_separate_encode": together["pipeline_s"] / summed["encode_busy_s"],
           "peak_rss_over_largest_single": together["peak_rss_mb"] / max(run["peak_rss_mb"] for run in separate)}
    print(f"\n{name} ({encoder} x {STORES}, {len(cohort)} slides)")
    print(f"{'run':<14} {'wall s':>8} {'loaded s':>8} {'tiles':>7} {'reads':>6} {'encode s':>9} {'RSS MB':>7} {'reader MB':>9}")
    for label, run in [*((f"alone #{i + 1}", r) for i, r in enumerate(separate)), ("one pass", together)]:
        print(f"{label:<14} {run['wall_s']:>8.1f} {run['pipeline_s']:>8.1f} {run['tiles']:>7.0f} {run['reader_tasks']:>6.0f} "
              f"{run['encode_busy_s']:>9.1f} {run['peak_rss_mb']:>7.0f} {run['largest_reader_rss_mb']:>9.0f}")
    print(f"{'sum alone':<14} {summed['wall_s']:>8.1f} {'':>8} {summed['tiles']:>7.0f} {summed['reader_tasks']:>6.0f} "
          f"{summed['encode_busy_s']:>9.1f}")
    print(f"one pass / sum of separate walls: {out['one_pass_over_separate_wall']:.2f}; one pass / sum of separate "
          f"encode times: {out['one_pass_over_separate_encode']:.2f} (from the encoders loaded: "
          f"{out['one_pass_pipeline_over_separate_encode']:.2f}); peak RSS / largest single run: "
          f"{out['peak_rss_over_largest_single']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--read-slides", type=int, default=6)
    parser.add_argument("--read-tiles", type=int, default=300, help="tiles per slide, read-bound workload")
    parser.add_argument("--encode-slides", type=int, default=2)
    parser.add_argument("--encode-tiles", type=int, default=120, help="tiles per slide, encoder-bound workload")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(one_run(spec["encoders"], spec["cohort"], Path(spec["work"]))))
        return
    work = Path(tempfile.mkdtemp(prefix="several_stores_bench_"))
    try:
        read_cohort = [slide_for_tiles(work / "read" / f"r{i}.tiff", args.read_tiles, mpp=0.25, seed=i)
                       for i in range(args.read_slides)]
        encode_cohort = [slide_for_tiles(work / "encode" / f"e{i}.tiff", args.encode_tiles, mpp=0.25, seed=10 + i)
                         for i in range(args.encode_slides)]
        results = {"machine": platform.platform(), "provenance": provenance(),
                   "read_bound": workload("read-bound", "virchow2-tiny", read_cohort, work / "runs"),
                   "encoder_bound": workload("encoder-bound", "virchow2-small", encode_cohort, work / "runs")}
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
