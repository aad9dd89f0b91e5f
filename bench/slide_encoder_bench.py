"""The slide-encoder pass (`python -m extract slide-embeddings`) over 1,000 stored slides, per slide encoder, beside
re-encoding those slides' tiles.

For each of PRISM, TITAN and Prov-GigaPath's slide encoder (their full-size random-init twins `prism-random`,
`titan-random`, `prov-gigapath-slide-random`: the same architecture and arithmetic as the published weights), a
store of `--slides` synthetic slides of the tile encoder it reads, at its card's tiling, is written once and
reused (cached in `--cache`, one store per tile encoder):

    PRISM       virchow-random        2560-d   224 px at 0.5 µm/px
    TITAN       conch-v1.5-random      768-d   512 px at 0.5 µm/px (a 2-D grid: TITAN places tiles by cell)
    GigaPath    prov-gigapath-random  1536-d   256 px at 0.5 µm/px

Tile counts: each slide's tissue area is log-normal, median 134 mm², sigma 0.6, clipped to [10, 700] mm² (mean
161 mm²: TCGA's 1.5e8 tiles of 224 px at 0.5 µm/px over 11,700 diagnostic slides), cut into the encoder's tiles:
mean ~12,800 tiles per slide for PRISM, ~9,800 for GigaPath, ~2,450 for TITAN. The tiles are the cells of one
irregular blob (a lobed ellipse) on the tile grid of a 0.25 µm/px scan. Slides are ordered so that any first K
are spread over the distribution (van der Corput order of the tile-count ranks), hence `--limit` times a fair
sample. Features are N(0, 1) float16, one row per slide repeated: compressible, so the three stores take ~2 GB
instead of ~100 GB; the model's arithmetic does not depend on the values. Reading real (incompressible) features
costs more: the read of one incompressible slide of the mean tile count is timed too (`read_incompressible_s`),
since the pass reads the next slide while it embeds this one and on a GPU the read can be what bounds it.

Timed per encoder, in a fresh process (its peak RSS is its own): the real pass (extract.slide_embeddings.
SlideEmbeddingJob: model build, plan, read-ahead, embed, write into a set, device auto with --precision auto:
fp32 on the CPU, fp16 autocast on CUDA as TRIDENT runs them) over the first `--limit` slides. Printed: s/slide,
slides/s, tiles/s, peak RSS (and peak CUDA memory), and the ratio of re-encoding those slides' tiles at the
tile-encoder throughput measured on an H200 (bench/RESULTS.md: 1,160 tiles/s, Virchow-2 in bf16; used for every
tile encoder: GigaPath's ViT-g is slower, so its ratio is an underestimate) to the pass. Where fewer than all
slides are timed, the 1,000-slide pass is projected (labelled so) from a fit of seconds = a + b x tiles over the
timed slides (the mean timed slide when fewer than 3 or the line is not positive), summed over every slide's tile
count, plus the pass's fixed set-up. `--budget-s` time-boxes each pass instead (the GPU script uses it).

The default sample fits ≤ 12 min on 2 idle cores for all three (once the stores exist: writing them is ~10 min
once on 2 cores; `--prepare-only` does just that). On a GPU, time every slide: `--limit 1000`.

    python bench/slide_encoder_bench.py [--slides 1000] [--limit K] [--encoders prism-random titan-random
        prov-gigapath-slide-random] [--device auto] [--cache bench_slide_encoders] [--workers N]
        [--prepare-only] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slidecache.provenance import provenance  # noqa: E402

ENCODERS = ("prism-random", "titan-random", "prov-gigapath-slide-random")
# the first K of the 1,000 slides timed on the CPU: ~11 min for the three on 2 busy cores (20 s, 5 s and 34 s per
# slide of about the mean size, 2026-12 smoke run), so ≤ 12 min on 2 idle ones
CPU_LIMITS = {"prism-random": 10, "titan-random": 24, "prov-gigapath-slide-random": 8}
AREA_MEDIAN_MM2, AREA_SIGMA, AREA_CLIP_MM2 = 134.0, 0.6, (10.0, 700.0)
SCAN_MPP = 0.25  # a 40x scan: a tile at 0.5 µm/px covers twice its side at level 0
H200_VIRCHOW2_TILES_PER_S = 1160.0  # bench/RESULTS.md, as bench/eval_bench.py
SET_NAME = "bench"
LAYOUT_VERSION = 1  # bump when the synthetic slides change: a cached store of another version is rewritten


# ---- the synthetic cohort ------------------------------------------------------------------------


def _van_der_corput(n: int) -> np.ndarray:
    """The first n points of the base-2 van der Corput sequence: any prefix is spread evenly over [0, 1)."""
    out = np.zeros(n)
    for i in range(n):
        k, denom, x = i + 1, 1.0, 0.0
        while k:
            denom *= 2
            x += (k & 1) / denom
            k >>= 1
        out[i] = x
    return out


def tile_counts(slides: int, tile_um: float, area_scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """Tiles per slide (in slide order) of `tile_um`-wide tiles: log-normal tissue areas (times `area_scale`: a
    smoke test's small slides), ordered so any first K slides sample the distribution's quantiles evenly."""
    rng = np.random.default_rng(seed)
    area = area_scale * np.clip(AREA_MEDIAN_MM2 * np.exp(AREA_SIGMA * rng.standard_normal(slides)), *AREA_CLIP_MM2)
    ranked = np.sort(area)
    order = np.minimum((_van_der_corput(slides) * slides).astype(int), slides - 1)
    rank = np.unique(order, return_index=True)[1]  # the first occurrence of each rank, in sequence order
    taken = order[np.sort(rank)]
    rest = np.setdiff1d(np.arange(slides), taken)  # ranks the sequence missed (duplicates): at the end
    area = ranked[np.concatenate([taken, rest])]
    return np.maximum(1, np.round(area * 1e6 / tile_um ** 2)).astype(int)


def tissue_cells(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) distinct grid cells (column, row) of one irregular blob: the n cells nearest the centre of a
    randomly lobed, elongated ellipse, in row-major order (as extraction writes them)."""
    half = int(np.ceil(np.sqrt(n) * 1.6)) + 2
    ys, xs = np.mgrid[-half:half, -half:half]
    aspect, angle, phase = rng.uniform(1.2, 1.8), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi, 2)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = (-xs * np.sin(angle) + ys * np.cos(angle)) * aspect
    theta = np.arctan2(v, u)
    lobes = 1 + 0.18 * np.sin(3 * theta + phase[0]) + 0.1 * np.sin(5 * theta + phase[1])
    score = np.hypot(u, v) / lobes + rng.uniform(0, 0.8, u.shape)  # a ragged edge
    pick = np.argsort(score, axis=None, kind="stable")[:n]
    cells = np.stack([xs.ravel()[pick], ys.ravel()[pick]], 1) + half
    return cells[np.lexsort((cells[:, 0], cells[:, 1]))].astype(np.int64)


def tile_store_spec(encoder: str) -> tuple[dict[str, Any], str]:
    """The fingerprint spec extraction writes for the random twin of the tile encoder `encoder` reads, at the
    slide encoder's card tiling; and that tile encoder's name."""
    from extract.config import ExtractConfig
    from extract.inference import expected_encoder
    from extract.slide_encoders import registered_slide_encoder
    from extract.targets import store_spec
    from slidecache.configs import shipped

    card = registered_slide_encoder(encoder)
    shipped_config = shipped("extract", f"{card.tile_encoder}.yaml")
    cfg = ExtractConfig.for_command(shipped_config if shipped_config.is_file() else None,
                                    {"encoder": f"{card.tile_encoder}-random", "tile_px": card.tile_px,
                                     "target_mpp": card.target_mpp})
    return store_spec(cfg, expected_encoder(cfg, "cpu")[0]), card.tile_encoder


def _write_slides(url: str, first: int, counts: list[int], side_lv0: float, seed: int,
                  incompressible: bool = False) -> None:
    """Write slides S{first:05d}... (one per count) into the store at `url` (a worker process: slides of one
    store are written by several processes at once, each owning its own slides, as extraction does)."""
    from store import EmbeddingStore

    store = EmbeddingStore.open(url, mode="a")
    for i, n in enumerate(counts, start=first):
        rng = np.random.default_rng((seed, i))
        cells = tissue_cells(n, rng)
        coords = (cells * side_lv0 + [2048, 2048]).astype(np.int64)
        if incompressible:
            features = rng.standard_normal((n, store.embedding_dim), dtype=np.float32).astype(np.float16)
        else:  # one random row repeated: the store compresses it ~60x; the model's cost is the same
            row = rng.standard_normal((1, store.embedding_dim), dtype=np.float32).astype(np.float16)
            features = np.broadcast_to(row, (n, store.embedding_dim))
        slide_id = f"S{i:05d}"
        attrs = {"patient_id": slide_id, "mpp": SCAN_MPP, "mpp_source": "bench", "tile_px_level0": side_lv0}
        with store.write_slide(slide_id, attrs, overwrite=slide_id in store) as writer:
            writer.append(coords, np.ones(n, np.float16), features)
            writer.commit()


def prepare(cache: Path, encoder: str, slides: int, workers: int, area_scale: float = 1.0) -> dict[str, Any]:
    """The store of `slides` synthetic slides for `encoder` (written once, then reused), and a store of one
    incompressible slide of the mean tile count; their urls and tile counts."""
    from extract.slide_encoders import registered_slide_encoder
    from store import EmbeddingStore

    card = registered_slide_encoder(encoder)
    spec, tile_encoder = tile_store_spec(encoder)
    side_lv0 = card.tile_px * card.target_mpp / SCAN_MPP
    counts = tile_counts(slides, card.tile_px * card.target_mpp, area_scale)
    name = f"{tile_encoder}-{slides}" + (f"-x{area_scale:g}" if area_scale != 1 else "")
    url, marker = cache / f"{name}.zarr", cache / f"{name}.json"
    facts = {"layout_version": LAYOUT_VERSION, "tile_encoder": f"{tile_encoder}-random", "slides": slides,
             "tile_px": card.tile_px, "target_mpp": card.target_mpp, "scan_mpp": SCAN_MPP,
             "tile_counts": counts.tolist()}
    if not (marker.is_file() and json.loads(marker.read_text()) == facts):
        shutil.rmtree(url, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        EmbeddingStore.create_or_open(str(url), kind="slides", spec=spec)
        step = max(1, -(-slides // (workers * 4)))  # a few tasks per worker: the big slides spread out
        with ProcessPoolExecutor(max_workers=workers) as pool:
            jobs = [pool.submit(_write_slides, str(url), first, counts[first:first + step].tolist(), side_lv0, 0)
                    for first in range(0, slides, step)]
            for job in jobs:
                job.result()
        marker.write_text(json.dumps(facts))
        print(f"[{encoder}] wrote {slides} slides, {counts.sum():,} tiles of {tile_encoder}-random into "
                  f"{url} in {time.perf_counter() - t0:.0f} s ({workers} processes)", flush=True)
    probe, probe_marker = cache / f"{name}-incompressible.zarr", cache / f"{name}-incompressible.json"
    mean_tiles = int(round(counts.mean()))
    probe_facts = {**facts, "tile_counts": [mean_tiles], "incompressible": True}
    if not (probe_marker.is_file() and json.loads(probe_marker.read_text()) == probe_facts):
        shutil.rmtree(probe, ignore_errors=True)
        EmbeddingStore.create_or_open(str(probe), kind="slides", spec=spec)
        _write_slides(str(probe), 0, [mean_tiles], side_lv0, 1, incompressible=True)
        probe_marker.write_text(json.dumps(probe_facts))
    return {"url": str(url), "probe_url": str(probe), "tile_encoder": tile_encoder, "counts": counts,
            "store_mb": sum(f.stat().st_size for f in url.rglob("*") if f.is_file()) / 1e6}


# ---- one timed pass (a child process) ------------------------------------------------------------


class _OverBudget(Exception):
    """Raised from the job's progress log once the time box is spent: the pass stops after that slide."""


def child(encoder: str, url: str, probe_url: str, limit: int | None, device: str,
          budget_s: float | None = None) -> dict[str, Any]:
    import torch

    import extract.slide_embeddings as slide_embeddings
    from extract.slide_embeddings import SlideEmbeddingJob, Status
    from store import EmbeddingStore

    probe = EmbeddingStore.open(probe_url).slide("S00000")
    reads = []
    for _ in range(3):  # the best of 3, from the page cache: the decode, not the disk
        t0 = time.perf_counter()
        probe.embeddings(), probe.coords()
        reads.append(time.perf_counter() - t0)
    EmbeddingStore.open(url, mode="a").delete_slide_embedding_set(SET_NAME)  # an earlier run's: embed again
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if budget_s is not None and "progress:" in line and time.perf_counter() - t0 > budget_s:
            raise _OverBudget

    if budget_s is not None:
        slide_embeddings.PROGRESS_EVERY_S = 0.0  # a progress line after every slide: the time box is checked there
    job = SlideEmbeddingJob(store=url, slide_encoder=encoder, device=device, precision="auto", set_name=SET_NAME,
                            limit=limit, log=log)
    t0, boxed = time.perf_counter(), False
    try:
        summary = job.run()
        wall = time.perf_counter() - t0
        failed = [o for o in summary.outcomes if o.status == Status.FAILED]
        if failed:
            raise SystemExit(f"{len(failed)} slides failed, first: {failed[0].slide_id}: {failed[0].error}")
        done = [(o.tiles, o.seconds) for o in summary.outcomes if o.status == Status.DONE]
    except _OverBudget:  # the slides embedded so far, with the seconds the job recorded for each
        wall, boxed = time.perf_counter() - t0, True
        entries = EmbeddingStore.open(url).slide_embedding_set(SET_NAME).entries()
        done = [(int(e["n_tiles"]), float(e["seconds"])) for _, e in sorted(entries.items())]
    EmbeddingStore.open(url, mode="a").delete_slide_embedding_set(SET_NAME)
    out = {"wall_s": wall, "slides": len(done), "tiles": [n for n, _ in done], "slide_s": [sec for _, sec in done],
           "time_boxed": boxed,
           "log": lines[0] if lines else "",
           "device": lines[0].split(" on ")[-1].split(" into ")[0] if lines else device,
           "read_incompressible_s": min(reads), "read_incompressible_tiles": probe.n_tiles,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def in_a_process(encoder: str, prepared: dict[str, Any], limit: int | None, device: str,
                 budget_s: float | None) -> dict[str, Any]:
    spec = json.dumps({"encoder": encoder, "url": prepared["url"], "probe_url": prepared["probe_url"],
                       "limit": limit, "device": device, "budget_s": budget_s})
    done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {encoder} pass failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- numbers -------------------------------------------------------------------------------------


def summarise(encoder: str, run: dict[str, Any], counts: np.ndarray) -> dict[str, Any]:
    tiles, seconds = np.asarray(run["tiles"], float), np.asarray(run["slide_s"], float)
    setup = run["wall_s"] - seconds.sum()  # model build, plan, the first read: once per pass
    out: dict[str, Any] = {
        "encoder": encoder, "device": run["device"], "time_boxed": run["time_boxed"],
        "slides_timed": int(len(tiles)), "slides_in_store": len(counts),
        "tiles_timed": int(tiles.sum()), "mean_tiles_timed": float(tiles.mean()),
        "mean_tiles_in_store": float(counts.mean()), "pass_wall_s": run["wall_s"], "setup_s": setup,
        "s_per_slide": float(seconds.mean()), "slides_per_s": len(tiles) / run["wall_s"],
        "tiles_per_s": float(tiles.sum() / run["wall_s"]), "peak_rss_mb": run["peak_rss_mb"],
        "read_incompressible_s": run["read_incompressible_s"],
        "read_incompressible_tiles": run["read_incompressible_tiles"],
        "reencode_s_at_h200_rate": float(tiles.sum() / H200_VIRCHOW2_TILES_PER_S),
        "timed_slides": [[int(t), round(float(x), 4)] for t, x in zip(tiles, seconds)],  # [tiles, seconds] each
    }
    out["reencode_over_pass"] = out["reencode_s_at_h200_rate"] / run["wall_s"]
    if "peak_cuda_mb" in run:
        out["peak_cuda_mb"] = run["peak_cuda_mb"]
    if len(tiles) < len(counts):  # projected from the timed slides to every slide of the store
        a, b = project_fit(tiles, seconds)
        projected = setup + float(np.sum(a * counts ** b))
        out["projected"] = {"slides": len(counts), "tiles": int(counts.sum()), "fit_c": a, "fit_power": b,
                            "pass_s": projected, "s_per_slide": projected / len(counts),
                            "reencode_s_at_h200_rate": float(counts.sum() / H200_VIRCHOW2_TILES_PER_S)}
        out["projected"]["reencode_over_pass"] = out["projected"]["reencode_s_at_h200_rate"] / projected
    return out


def project_fit(tiles: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(c, p) of seconds = c × tiles^p, least squares on the logs of the timed slides. A power law, not a line:
    TITAN's attention over every tile grows faster than the tiles (p ≈ 1.6 on 2 cores), PRISM's latents cost a
    fixed part per slide (p < 1); a line would go negative for one and under-project the other's large slides.
    With too few slides for a fit: proportional to the tiles (p = 1)."""
    if len(tiles) >= 3 and np.ptp(tiles) > 0:
        power, log_c = np.polyfit(np.log(tiles), np.log(np.maximum(seconds, 1e-6)), 1)
        return float(np.exp(log_c)), float(power)
    return float(seconds.sum() / max(tiles.sum(), 1.0)), 1.0


def report(results: list[dict[str, Any]]) -> None:
    print(f"\n{'slide encoder':<27} {'device':<13} {'slides':>6} {'tiles/slide':>11} {'s/slide':>8} "
          f"{'slides/s':>8} {'tiles/s':>8} {'RSS MB':>7} {'read* s':>7} {'re-enc ÷ pass':>13}")
    for r in results:
        print(f"{r['encoder']:<27} {r['device']:<13} {r['slides_timed']:>6} {r['mean_tiles_timed']:>11,.0f} "
              f"{r['s_per_slide']:>8.3f} {r['slides_per_s']:>8.2f} {r['tiles_per_s']:>8,.0f} {r['peak_rss_mb']:>7.0f} "
              f"{r['read_incompressible_s']:>7.3f} {r['reencode_over_pass']:>12,.1f}x")
    print("measured: the first slides of the store, pass wall (model build included); read* s: one incompressible "
          "slide of the store's mean tile count, from the page cache")
    projected = [r for r in results if "projected" in r]
    for r in projected:
        p = r["projected"]
        print(f"PROJECTED {r['encoder']} over all {p['slides']} slides ({p['tiles']:,} tiles, from "
              f"{r['slides_timed']} timed: s = {p['fit_c']:.3g} x tiles^{p['fit_power']:.2f}): "
              f"{p['pass_s'] / 60:.1f} min, {p['s_per_slide']:.2f} s/slide; re-encoding their tiles at "
              f"{H200_VIRCHOW2_TILES_PER_S:.0f} tiles/s (one H200) {p['reencode_s_at_h200_rate'] / 3600:.1f} h, "
              f"{p['reencode_over_pass']:,.1f}x the pass")
    for r in results:
        if r.get("peak_cuda_mb"):
            print(f"{r['encoder']}: peak CUDA memory {r['peak_cuda_mb']:,.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--slides", type=int, default=1000, help="slides in each store")
    parser.add_argument("--limit", type=int, help="slides timed per encoder, the first of the store (default: on "
                                                  "the CPU " + ", ".join(f"{k} {v}" for k, v in CPU_LIMITS.items())
                                                  + "; on CUDA all)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda")
    parser.add_argument("--cache", type=Path, default=Path("bench_slide_encoders"),
                        help="where the stores are written once and reused")
    parser.add_argument("--budget-s", type=float, help="stop each encoder's pass after the slide that ends past "
                                                       "this many seconds (a time box; the rest is projected)")
    parser.add_argument("--area-scale", type=float, default=1.0, help="tissue areas times this (a smoke test: 0.02)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the stores")
    parser.add_argument("--prepare-only", action="store_true", help="write the stores and stop")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["encoder"], spec["url"], spec["probe_url"], spec["limit"], spec["device"],
                               spec["budget_s"])))
        return 0
    import torch

    from slidecache.devices import pick_device

    on_cuda = pick_device(args.device).type == "cuda"
    prepared = {}
    for encoder in args.encoders:
        t0 = time.perf_counter()
        prepared[encoder] = prepare(args.cache, encoder, args.slides, args.workers, args.area_scale)
        prepared[encoder]["prepare_s"] = time.perf_counter() - t0
    if args.prepare_only:
        return 0
    results = []
    for encoder in args.encoders:
        limit = args.limit if args.limit is not None else None if on_cuda else CPU_LIMITS[encoder]
        limit = None if limit is not None and limit >= args.slides else limit
        box = f", stopping after {args.budget_s:g} s" if args.budget_s else ""
        print(f"[{encoder}] timing the pass over {limit or args.slides} of {args.slides} slides{box} ...", flush=True)
        run = in_a_process(encoder, prepared[encoder], limit, args.device, args.budget_s)
        result = summarise(encoder, run, prepared[encoder]["counts"])
        result["store_mb"] = prepared[encoder]["store_mb"]
        results.append(result)
        print(f"[{encoder}] {run['log']}", flush=True)
    report(results)
    if args.json:
        out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
                          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
               "slides": args.slides, "tile_area_mm2": {"median": AREA_MEDIAN_MM2, "sigma": AREA_SIGMA,
                                                        "clip": list(AREA_CLIP_MM2), "scale": args.area_scale},
               "h200_tiles_per_s": H200_VIRCHOW2_TILES_PER_S, "results": results, "provenance": provenance()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
