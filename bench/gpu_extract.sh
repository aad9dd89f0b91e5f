#!/usr/bin/env bash
# Encoder throughput on one CUDA GPU (virchow2-random, bf16, batch 64-512) and its MFU.
# Needs only python3 with torch and timm; no network, no install; run from the source tree.
# Usage: bash bench/gpu_extract.sh [--batches 64,128,256,512] [--iters 10] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
"$PY" -c 'import torch, timm' || { echo "gpu_extract.sh needs torch and timm importable by $PY" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec "$PY" bench/gpu_extract.py "$@"
