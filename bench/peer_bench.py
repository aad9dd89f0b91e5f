"""Extraction side by side with TRIDENT on the same slides, in one run, on one machine.

TRIDENT (mahmoodlab/TRIDENT, CC-BY-NC-ND-4.0) is installed unmodified outside the repository as
../shared/peer/README.md describes; this script only runs it, through that folder's `bench_trident.py`,
with the same encoder architectures (`tiny` = our `virchow2-tiny`, `small` = our `virchow2-small`, random
weights, fp32 on CPU) and `min_tissue_proportion=0.25` (our rule, so both keep nearly the same tiles).
slidecache runs as a user types it (`python -m extract --cohort DIR --store DIR/store.zarr --encoder NAME`,
its defaults, QC pictures on). The tools alternate (the order flips every round) on the same files, each
read once beforehand so both meet a warm page cache. Printed per tool: wall, wall per slide, tiles, tiles/s
end to end, feature-step tiles/s, peak RSS and PSS of the whole process tree (../shared/peer/treerss2.py),
bytes written, and the Jaccard overlap of the two tile sets.

Workloads: `one` (the peer's synthetic 20000 x 15000 px slide, seed 1234) and `cohort` (N such slides,
seeds 1234 + i, where start-up amortises). The slides are written once into --work by the peer's
`make_slide.py` (run in TRIDENT's python, which has OpenCV), with its seed replaced.

    python bench/peer_bench.py --trident-python T/venv/bin/python [--encoders tiny,small] \\
        [--workloads one,cohort] [--cohort-size 8] [--rounds 1] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from slidecache.provenance import provenance  # noqa: E402

PEER_DIR = Path(os.environ.get("SLIDECACHE_PEER_DIR", REPO_ROOT.parent / "shared" / "peer"))
OURS = {"tiny": "virchow2-tiny", "small": "virchow2-small"}  # TRIDENT's encoders.py name → our registry name
TRIDENT_BATCH = 64
MIN_TISSUE = 0.25
BASE_SEED = 1234  # make_slide.py's own seed: slide 0 is the peer README's reference slide
# make_slide.py with its fixed seed replaced (argv: make_slide.py OUT SEED); the file itself is run unmodified.
SEEDED_MAKE_SLIDE = ("import runpy, sys, numpy as np; seed = int(sys.argv.pop()); real = np.random.default_rng; "
                     "np.random.default_rng = lambda *_: real(seed); sys.argv = sys.argv[1:]; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")
SETUP_HINT = ("TRIDENT is not set up: follow ../shared/peer/README.md (about 2 minutes, offline), then pass "
              "--trident-python T/venv/bin/python or set SLIDECACHE_TRIDENT_PYTHON")


def make_slides(trident_python: str, folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"peer{i}.tif"
        if not path.is_file():
            partial = path.with_suffix(".partial.tif")
            subprocess.run([trident_python, "-c", SEEDED_MAKE_SLIDE, str(PEER_DIR / "make_slide.py"), str(partial),
                            str(BASE_SEED + i)], check=True, stdout=subprocess.DEVNULL)
            partial.rename(path)
        paths.append(path)
    return paths


def warm(paths: list[Path]) -> None:
    """Read every slide once, so both tools start from the same (warm) page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_tree(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run a command under the peer's process-tree memory monitor; wall time from here."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(PEER_DIR / "treerss2.py"), *cmd], cwd=cwd, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}); see {log}")

    def mb(name: str) -> float | None:
        found = re.search(rf"{name} (\d+)", done.stderr)
        return float(found.group(1)) if found else None

    return {"wall_s": wall, "peak_rss_mb": mb("TREE_PEAK_RSS_MB"), "peak_pss_mb": mb("TREE_PEAK_PSS_MB"),
            "stdout": done.stdout}


def run_trident(trident_python: str, encoder: str, slides: Path, job: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = run_tree([trident_python, str(PEER_DIR / "bench_trident.py"), encoder, str(slides), str(job),
                    str(TRIDENT_BATCH), ".tif", str(MIN_TISSUE)], job, env, job / "run.log")
    bench = json.loads((job / "bench.json").read_text())
    coords = {}
    import h5py

    for path in sorted(job.glob("*/patches/*_patches.h5")):
        with h5py.File(path) as f:
            coords[path.name[: -len("_patches.h5")]] = {tuple(int(v) for v in xy) for xy in f["coords"][:]}
    return {**{k: v for k, v in out.items() if k != "stdout"}, "tiles": bench["n_tiles"],
            "feature_tiles_per_s": bench["feat_tiles_per_s"], "bytes": disk_bytes(job), "coords": coords,
            "stages_s": {k: round(v, 2) for k, v in bench.items() if k.startswith("t_")}}


def run_slidecache(encoder: str, slides: Path, job: Path, executor: str = "default") -> dict[str, Any]:
    store = job / "store.zarr"
    chosen = [] if executor == "default" else ["--executor", executor]
    out = run_tree([sys.executable, "-m", "extract", "--cohort", str(slides), "--store", str(store),
                    "--encoder", OURS[encoder], *chosen], REPO_ROOT, {**os.environ, "PYTHONUNBUFFERED": "1"}, job / "run.log")
    from store import EmbeddingStore

    opened = EmbeddingStore.open(str(store))
    coords = {sid: {tuple(int(v) for v in xy) for xy in opened.slide(sid).coords()} for sid in opened.slide_ids()}
    loaded = re.search(r"([\d.]+) tiles/s once the encoders were loaded", out["stdout"])
    return {**{k: v for k, v in out.items() if k != "stdout"}, "tiles": sum(len(c) for c in coords.values()),
            "feature_tiles_per_s": float(loaded.group(1)) if loaded else None, "bytes": disk_bytes(job),
            "coords": coords}


def jaccard(a: dict[str, set], b: dict[str, set]) -> float:
    inter = sum(len(a[k] & b.get(k, set())) for k in a)
    union = sum(len(a[k] | b.get(k, set())) for k in a) + sum(len(b[k]) for k in b if k not in a)
    return inter / union if union else 1.0


def _tool(executor: str) -> str:
    return "slidecache" if executor == "default" else f"slidecache-{executor}"


def compare(trident_python: str, encoder: str, slides: list[Path], work: Path, rounds: int,
            executors: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    folder = work / f"cohort{len(slides)}"
    folder.mkdir(exist_ok=True)
    for path in slides:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
    ours = {_tool(e): e for e in executors}
    runs: dict[str, list[dict[str, Any]]] = {"trident": [], **{tool: [] for tool in ours}}
    for r in range(rounds):
        order = ["trident", *ours] if r % 2 == 0 else [*ours, "trident"]
        for tool in order:
            job = Path(tempfile.mkdtemp(prefix=f"{tool}-{encoder}-", dir=work))
            warm(slides)
            result = (run_trident(trident_python, encoder, folder, job) if tool == "trident"
                      else run_slidecache(encoder, folder, job, ours[tool]))
            runs[tool].append(result)
            print(f"  round {r + 1} {tool:<10} {encoder}: {result['tiles']} tiles in {result['wall_s']:.1f} s "
                  f"({result['tiles'] / result['wall_s']:.2f} tiles/s)", flush=True)
    overlap = jaccard(runs["trident"][0]["coords"], runs[next(iter(ours))][0]["coords"])
    summary = {}
    for tool, results in runs.items():
        best = min(results, key=lambda x: x["wall_s"])
        summary[tool] = {
            "wall_s": [round(x["wall_s"], 2) for x in results],
            "wall_per_slide_s": round(best["wall_s"] / len(slides), 2),
            "tiles": best["tiles"],
            "tiles_per_s": round(best["tiles"] / best["wall_s"], 2),
            "feature_tiles_per_s": round(best["feature_tiles_per_s"], 2) if best["feature_tiles_per_s"] else None,
            "peak_rss_mb": best["peak_rss_mb"], "peak_pss_mb": best["peak_pss_mb"], "bytes": best["bytes"],
            **({"stages_s": best["stages_s"]} if "stages_s" in best else {}),
        }
    theirs = summary["trident"]
    ratios = {tool: {"tiles_per_s": round(summary[tool]["tiles_per_s"] / theirs["tiles_per_s"], 3),
                     "wall_per_slide": round(summary[tool]["wall_per_slide_s"] / theirs["wall_per_slide_s"], 3)}
              for tool in ours}
    first = ratios[next(iter(ours))]
    return {"encoder": encoder, "slides": len(slides), "tools": summary, "tile_jaccard": round(overlap, 3),
            "ratio_tiles_per_s": first["tiles_per_s"], "ratio_wall_per_slide": first["wall_per_slide"],
            "ratios": ratios}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['slides']} slide(s), encoder {result['encoder']} (ours {OURS[result['encoder']]}):")
    print(f"  {'tool':<16} {'wall s':>14} {'s/slide':>8} {'tiles':>7} {'tiles/s':>8} {'feature t/s':>11} "
          f"{'RSS MB':>7} {'PSS MB':>7} {'MB disk':>8}")
    for tool, row in result["tools"].items():
        walls = "/".join(f"{w:.1f}" for w in row["wall_s"])
        feature = f"{row['feature_tiles_per_s']:.1f}" if row["feature_tiles_per_s"] else "-"
        print(f"  {tool:<16} {walls:>14} {row['wall_per_slide_s']:>8.1f} {row['tiles']:>7} {row['tiles_per_s']:>8.2f} "
              f"{feature:>11} {row['peak_rss_mb'] or 0:>7.0f} {row['peak_pss_mb'] or 0:>7.0f} {row['bytes'] / 1e6:>8.1f}")
    for tool, ratio in result["ratios"].items():
        print(f"  {tool} / TRIDENT: tiles/s {ratio['tiles_per_s']:.2f}x, wall per slide {ratio['wall_per_slide']:.2f}x")
    print(f"  tile sets' Jaccard {result['tile_jaccard']:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trident-python", default=os.environ.get("SLIDECACHE_TRIDENT_PYTHON"),
                   help="python of the TRIDENT venv (../shared/peer/README.md)")
    p.add_argument("--encoders", default="tiny,small")
    p.add_argument("--workloads", default="one,cohort")
    p.add_argument("--cohort-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--executors", default="default",
                   help="our runs, comma-separated: default (what `python -m extract` picks), ray, local")
    p.add_argument("--work", type=Path, help="where slides and outputs go (default: a temporary folder; slides "
                                             "are reused from it when it is given again)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not args.trident_python or not Path(args.trident_python).is_file() or not (PEER_DIR / "bench_trident.py").is_file():
        print(f"skipped: {SETUP_HINT} (peer folder {PEER_DIR})")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="peer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    workloads = args.workloads.split(",")
    count = max(args.cohort_size if "cohort" in workloads else 1, 1)
    slides = make_slides(args.trident_python, work / "slides", count)
    print(f"peer bench on {platform.node()} ({os.cpu_count()} cores); slides in {work / 'slides'}", flush=True)
    results = []
    for workload in workloads:
        chosen = slides[:1] if workload == "one" else slides[: args.cohort_size]
        for encoder in args.encoders.split(","):
            print(f"{workload}: {len(chosen)} slide(s), {encoder}", flush=True)
            result = compare(args.trident_python, encoder, chosen, work, args.rounds, tuple(args.executors.split(",")))
            print_table(result)
            results.append({"workload": workload, **result})
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cores": os.cpu_count(), "machine": platform.platform(),
                                         "provenance": provenance({"bench": "peer_bench", **vars(args)})},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
