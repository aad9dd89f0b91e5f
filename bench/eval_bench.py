"""Re-fitting heads from the cache vs re-encoding: seconds per full cross-validation, side by side.

Writes a store of synthetic slides (2560-d, 512 tiles each, a planted risk direction) and a clinical
table, then times, from the store, 5-fold Coxnet on the stored slide vectors (target on 2 cores: ≤ 10 s)
and 5-fold ABMIL-Cox on the tiles, at most 512 sampled per bag (target: ≤ 10 min), and prints each
one's ratio to what re-encoding those slides would cost at the encoder throughput measured on an H200
(bench/RESULTS.md: 1,160 tiles/s for Virchow-2 in bf16), for the given tiles per slide.

Each attention-MIL head (`--heads`: any survival head of evaluate/survival.py's HEADS on tiles, abmil, transmil,
clam-sb or dsmil with -cox or -nll; default coxnet and abmil-cox, as before) gets: the seconds of its 5-fold fit and
scoring, split into the fit's set-up (one training call of 0 epochs on fold 0's training bags, timed beforehand:
tile statistics, the network, the bags staged on the device; counted once per fold), its epochs (the training
calls' seconds less the set-up; seconds per epoch over the 5 folds) and the scoring (risks, Breslow baseline,
metrics); and the held-out Harrell's C. With `--epochs` below the CLI's 20 the whole fit at 20 epochs is also
printed, labelled projected (set-up + scoring + 20 x the seconds per epoch). On a GPU the target is ≤ 2 min per
head at 20 epochs.

    python bench/eval_bench.py [--slides 1000 --dim 2560 --tiles 512 --tiles-per-real-slide 10000 --skip-abmil]
        [--heads coxnet abmil-cox transmil-cox clam-sb-cox dsmil-cox] [--epochs 20] [--device auto]
        [--cache DIR [--prepare-only]] [--json F]

On 2 cores one epoch of each (projected to 20), the cohort written once into a cache (~2.5 min) and reused; at
1,000 slides x 512 tiles one epoch and the scoring cost ~3 min for ABMIL and CLAM-SB, ~4.5 for DSMIL and ~9 for
TransMIL there, so the four take two runs (~13 and ~10 min):
    python bench/eval_bench.py --heads abmil-cox clam-sb-cox dsmil-cox --epochs 1 --cache bench_eval_cohort
    python bench/eval_bench.py --heads transmil-cox --epochs 1 --cache bench_eval_cohort
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate.abmil  # noqa: E402
from evaluate.abmil import TrainSettings, load_bags  # noqa: E402
from evaluate.features import PatientData, patient_features  # noqa: E402
from evaluate.survival import MIL_HEADS, cross_validate  # noqa: E402
from slidecache.cohorts.clinical import load_clinical  # noqa: E402
from slidecache.cohorts.splits import make_folds  # noqa: E402
from slidecache.devices import pick_device  # noqa: E402
from slidecache.provenance import provenance  # noqa: E402
from store import EmbeddingStore  # noqa: E402

H200_VIRCHOW2_TILES_PER_S = 1160.0
HEAD_CHOICES = ("coxnet", *MIL_HEADS)
DEFAULT_EPOCHS = TrainSettings.epochs


def _write_slide(url: str, i: int, coords: np.ndarray, emb: np.ndarray) -> None:
    """One slide into the store (a writer process: slides are written by several at once, each its own)."""
    store = EmbeddingStore.open(url, mode="a")
    with store.write_slide(f"S{i:05d}", {"patient_id": f"P{i:05d}"}) as writer:
        writer.append(coords, np.ones(len(coords)), emb)
        writer.commit()


def write_cohort(root: Path, slides: int, dim: int, tiles: int, seed: int = 0, workers: int = 1) -> tuple[str, Path]:
    """The store and clinical table of `slides` synthetic slides in `root`; a complete one there is reused. The
    numbers are drawn here, in order, whatever `workers` (processes writing them): the same cohort every time."""
    done = root / "cohort.json"
    facts = {"slides": slides, "dim": dim, "tiles": tiles, "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == facts:
        return str(root / "store"), root / "clinical.csv"
    shutil.rmtree(root / "store", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    risk = rng.normal(size=slides)
    spec = {"encoder": {"name": "bench-synthetic", "dim": dim, "dtype": "float16"}, "tiling": {"tile_px": 224}}
    url = str(root / "store")
    EmbeddingStore.create_or_open(url, kind="slides", spec=spec)
    coords = np.stack([np.arange(tiles) * 448, np.zeros(tiles)], 1).astype(np.int64)
    slides_drawn = ((i, (risk[i] * 3 * direction + rng.normal(size=(tiles, dim))).astype(np.float16))
                    for i in range(slides))
    if workers <= 1:
        for i, emb in slides_drawn:
            _write_slide(url, i, coords, emb)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: list[Future[None]] = []
            for i, emb in slides_drawn:
                pending.append(pool.submit(_write_slide, url, i, coords, emb))
                if len(pending) >= 2 * workers:  # a few slides in flight: memory stays small
                    pending.pop(0).result()
            for job in pending:
                job.result()
    event_time = rng.exponential(1 / (0.001 * np.exp(1.5 * risk)))
    censor = rng.uniform(200, 3000, slides)
    table = root / "clinical.csv"
    rows = [f"P{i:05d},{int(event_time[i] <= censor[i])},{min(event_time[i], censor[i]):.1f}" for i in range(slides)]
    table.write_text("patient_id,OS,OS.time\n" + "\n".join(rows) + "\n")
    done.write_text(json.dumps(facts))
    return url, table


def time_mil_head(head: str, data: PatientData, folds: dict[str, int], bags: np.ndarray,
                  settings: TrainSettings) -> dict[str, Any]:
    """One MIL head's 5-fold cross-validation, its seconds split into set-up, epochs and scoring."""
    architecture, loss = MIL_HEADS[head]
    has, times, events = data.endpoint("OS")
    train = np.array([has[i] and folds.get(pid, -1) not in (-1, 0) for i, pid in enumerate(data.patient_ids)])
    setups = []
    for rows in (np.flatnonzero(train)[:16], np.flatnonzero(train)):  # a small call first: it pays the lazy
        t0 = time.perf_counter()  # imports and the device's warm-up; then one fold's whole set-up (all train_mil
        evaluate.abmil.train_mil(list(bags[rows]), loss, 0, dataclasses.replace(settings, epochs=0),  # does
                                 time=times[rows].astype(np.float64), event=events[rows].astype(bool),  # before
                                 architecture=architecture)  # its first epoch)
        setups.append(time.perf_counter() - t0)
    setup_per_fold = setups[-1]
    fits: list[float] = []
    real_train_mil = evaluate.abmil.train_mil

    def timed_train_mil(*args: Any, **kwargs: Any) -> Any:  # fit_mil imports it at call time: this one is used
        started = time.perf_counter()
        try:
            return real_train_mil(*args, **kwargs)
        finally:
            fits.append(time.perf_counter() - started)

    evaluate.abmil.train_mil = timed_train_mil
    try:
        t0 = time.perf_counter()
        result = cross_validate(data, "OS", head, folds, 0, bags, settings)
        total = time.perf_counter() - t0
    finally:
        evaluate.abmil.train_mil = real_train_mil
    setup = setup_per_fold * len(fits)
    epochs_s = max(0.0, sum(fits) - setup)
    out = {"head": head, "epochs": settings.epochs, "folds": len(fits), "fit_5fold_s": total,
           "setup_s": setup, "setup_per_fold_s": setup_per_fold, "epochs_s": epochs_s,
           "s_per_epoch": epochs_s / max(settings.epochs, 1), "scoring_s": total - sum(fits),
           "harrell_c": result.summary["harrell_c"]["mean"]}
    if settings.epochs != DEFAULT_EPOCHS:
        out["projected_at_default_epochs"] = {"epochs": DEFAULT_EPOCHS,
                                              "fit_5fold_s": total + (DEFAULT_EPOCHS - settings.epochs)
                                              * out["s_per_epoch"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--tiles", type=int, default=512, help="tiles stored per synthetic slide")
    parser.add_argument("--tiles-per-real-slide", type=int, default=10000, help="for the re-encoding comparison")
    parser.add_argument("--max-tiles", type=int, default=512, help="tiles sampled per MIL bag")
    parser.add_argument("--heads", nargs="+", default=["coxnet", "abmil-cox"], choices=HEAD_CHOICES,
                        metavar="HEAD", help=f"survival heads, in this order (of: {', '.join(HEAD_CHOICES)})")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="MIL epochs (default: the CLI's)")
    parser.add_argument("--skip-abmil", action="store_true", help="no MIL head (Coxnet only)")
    parser.add_argument("--device", default="auto", help="where MIL heads train: auto (CUDA when visible), cpu, cuda")
    parser.add_argument("--cache", type=Path, help="write the cohort here once and reuse it (default: a temporary "
                                                   "folder, removed)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing the cohort (the same numbers)")
    parser.add_argument("--prepare-only", action="store_true", help="write the cohort into --cache and stop")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.prepare_only and not args.cache:
        parser.error("--prepare-only needs --cache")
    mil_heads = [] if args.skip_abmil else [h for h in args.heads if h != "coxnet"]
    work = args.cache or Path(tempfile.mkdtemp(prefix="eval_bench_"))
    try:
        t0 = time.perf_counter()
        before = (work / "cohort.json").read_text() if (work / "cohort.json").is_file() else None
        url, table = write_cohort(work, args.slides, args.dim, args.tiles, workers=args.workers)
        write_s = time.perf_counter() - t0
        reused = before == (work / "cohort.json").read_text()  # written by an earlier run: write_s is its check
        if args.prepare_only:
            print(f"cohort of {args.slides} slides in {work}: {write_s:.1f} s")
            return 0
        t0 = time.perf_counter()
        data = patient_features(EmbeddingStore.open(url), load_clinical(table))
        load_s = time.perf_counter() - t0
        _, _, events = data.endpoint("OS")
        folds = make_folds(data.patient_ids, events, 5, 0)
        coxnet: dict[str, Any] = {}
        if "coxnet" in args.heads:
            t0 = time.perf_counter()
            result = cross_validate(data, "OS", "coxnet", folds)
            coxnet_s = time.perf_counter() - t0
            coxnet = {"coxnet_5fold_s": coxnet_s, "coxnet_harrell_c": result.summary["harrell_c"]["mean"]}
            print(f"5-fold Coxnet: {coxnet_s:.1f} s", flush=True)
        mil: dict[str, Any] = {}
        if mil_heads:
            t0 = time.perf_counter()
            bags = load_bags(EmbeddingStore.open(url), data.slides, args.max_tiles, 0)
            mil["load_bags_s"] = time.perf_counter() - t0
            print(f"read {sum(len(b) for b in bags):,} tiles into bags: {mil['load_bags_s']:.1f} s", flush=True)
            settings = TrainSettings(epochs=args.epochs, device=args.device)
            mil["mil_settings"] = vars(settings) | {"max_tiles": args.max_tiles}
            mil["heads"] = {}
            for head in mil_heads:
                timed = time_mil_head(head, data, folds, bags, settings)
                mil["heads"][head] = timed
                if args.json:  # each head as it ends: a run stopped by a time limit keeps the heads it fitted
                    args.json.write_text(json.dumps({"slides": args.slides, "partial": True, **coxnet, **mil},
                                                    indent=2))
                print(f"5-fold {head} ({args.epochs} epochs): {timed['fit_5fold_s']:.1f} s "
                      f"(C = {timed['harrell_c']:.3f})", flush=True)
            if "abmil-cox" in mil["heads"]:  # the keys of the runs before --heads (bench/results/eval_bench_*)
                mil["abmil_cox_5fold_s"] = mil["heads"]["abmil-cox"]["fit_5fold_s"]
                mil["abmil_cox_harrell_c"] = mil["heads"]["abmil-cox"]["harrell_c"]
                mil["abmil_settings"] = mil["mil_settings"]
            del bags
    finally:
        if not args.cache:
            shutil.rmtree(work, ignore_errors=True)
    reencode_s = args.slides * args.tiles_per_real_slide / H200_VIRCHOW2_TILES_PER_S
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        "slides": args.slides, "dim": args.dim, "tiles_per_slide_stored": args.tiles,
        "store_write_s": write_s, "store_reused": reused, "load_pooled_vectors_s": load_s,
        **coxnet, "reencode_s_at_h200_rate": reencode_s, **mil,
        "versions": provenance()["packages"],
    }
    if coxnet:
        out["speedup_vs_reencode"] = reencode_s / (load_s + coxnet["coxnet_5fold_s"])
        print(f"{args.slides} slides of {args.dim}-d: read pooled vectors {load_s:.1f} s, 5-fold Coxnet "
              f"{coxnet['coxnet_5fold_s']:.1f} s (target <= 10 s; C = {coxnet['coxnet_harrell_c']:.3f})")
        print(f"re-encoding {args.slides} slides x {args.tiles_per_real_slide} tiles at "
              f"{H200_VIRCHOW2_TILES_PER_S:.0f} tiles/s (one H200) would take {reencode_s / 3600:.1f} h: the cache is "
              f"{out['speedup_vs_reencode']:,.0f}x faster per re-fit")
    if mil.get("heads"):
        print(f"\n5-fold MIL heads on {args.slides} slides, <= {args.max_tiles} tiles/bag (read bags "
              f"{mil['load_bags_s']:.1f} s), {args.epochs} epochs, batch {TrainSettings.batch_size}, on "
              f"{pick_device(args.device)}:")
        print(f"{'head':<14} {'5-fold s':>9} {'set-up s':>9} {'s/epoch':>8} {'scoring s':>9} {'C':>6} "
              f"{'at ' + str(DEFAULT_EPOCHS) + ' epochs s':>16} {'x re-encode':>11}")
        for head, r in mil["heads"].items():
            at_default = r.get("projected_at_default_epochs", {}).get("fit_5fold_s", r["fit_5fold_s"])
            r["speedup_vs_reencode"] = reencode_s / (mil["load_bags_s"] + r["fit_5fold_s"])
            label = "projected " if "projected_at_default_epochs" in r else "measured "
            print(f"{head:<14} {r['fit_5fold_s']:>9.1f} {r['setup_s']:>9.1f} {r['s_per_epoch']:>8.2f} "
                  f"{r['scoring_s']:>9.1f} {r['harrell_c']:>6.3f} {label + f'{at_default:.0f}':>16} "
                  f"{r['speedup_vs_reencode']:>10,.0f}x")
        print(f"s/epoch: one epoch over all {len(set(folds.values()))} folds' training bags; at {DEFAULT_EPOCHS} "
              "epochs: "
              f"measured when --epochs is {DEFAULT_EPOCHS}, else projected = 5-fold s + ({DEFAULT_EPOCHS} - "
              f"{args.epochs}) x s/epoch; target on a GPU <= 120 s per head")
        if "abmil_cox_5fold_s" in mil:
            out["abmil_speedup_vs_reencode"] = mil["heads"]["abmil-cox"]["speedup_vs_reencode"]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
