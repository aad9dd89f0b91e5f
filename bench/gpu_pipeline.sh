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
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# The project's pins (pyproject.toml), for Python 3.12 on x86-64 Linux, and what they need that the GPU image lacks.
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 tiffslide==3.0.1 imagecodecs==2026.3.6 tifffile==2026.3.3"

SCRIPT=gpu_pipeline.sh
source bench/gpu_wheels.sh
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  rm -rf .whl
  fetch_wheels $WHEELS
  exit 0
fi
ensure_imports 'import zarr, numcodecs, tiffslide, imagecodecs'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec "$PY" bench/gpu_pipeline.py "$@"
