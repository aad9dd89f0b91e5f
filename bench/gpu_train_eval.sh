#!/usr/bin/env bash
# Training and evaluation from the cache on one CUDA GPU, in one short run:
#   1. bench/train_bench.py: step from the cache vs on tensors in memory vs with virchow2-random run live
#      (measured, bf16), at 16/64/256 tiles per sample, LLM qwen2-0.5b-random + LoRA 16;
#   2. bench/eval_bench.py --device cuda: 5-fold Coxnet and ABMIL-Cox on 1,000 synthetic slides x 512 tiles;
#   3. the training tests (HF Trainer, resume, adapter, merge, generation) with CUDA visible.
# Usage: bash bench/gpu_train_eval.sh OUTDIR
# Where the machine lacks the project's pins, wheels in .whl/ are installed to /tmp/site first (see
# bench/RESULTS.md), and .gpucache/tokenizers.tgz seeds the offline Qwen2 tokenizer cache.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-/tmp/slidecache_gpu}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site
fi
if [ -f .gpucache/tokenizers.tgz ]; then
  mkdir -p /tmp/slidecache_cache && tar xzf .gpucache/tokenizers.tgz -C /tmp/slidecache_cache
  export SLIDECACHE_CACHE=/tmp/slidecache_cache
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"
python3 -c 'import sys, torch, transformers, peft, timm, zarr, sksurv; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "timm", timm.__version__, "zarr", zarr.__version__, "sksurv", sksurv.__version__)' \
  | tee -a "$OUT_DIR/gpu.txt" || exit 2
status=0
run() {  # name, seconds, command...: each part is bounded, so one slow part leaves time for the next
  local name=$1 seconds=$2; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then return; fi
  timeout "$seconds" "$@" 2>&1 | tee "$OUT_DIR/$name.log" || status=1
}
run eval_bench_gpu 300 python3 bench/eval_bench.py --device cuda --json "$OUT_DIR/eval_bench_gpu.json"
run pytest_train_cuda 80 python3 -m pytest -q -p no:cacheprovider tests/train/test_train_run.py
run train_bench_gpu 90 python3 bench/train_bench.py --tiles 16 64 256 --steps 24 --json "$OUT_DIR/train_bench_gpu.json"
exit $status
