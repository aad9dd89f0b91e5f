#!/usr/bin/env bash
# Evaluation and slide embeddings from the cache on one CUDA GPU, in one call of < 10 min (CALL_S, default 585 s,
# bounds it: each part gets at most what is left; run it with the device call's timeout at 600 s):
#   1. prepare (CPU, both at once): the eval cohort (1,000 slides x 512 tiles of 2560-d, bench/eval_bench.py) and
#      the three 1,000-slide tile stores the slide encoders read (bench/slide_encoder_bench.py);
#   2. slide_encoders: the pass of `extract slide-embeddings` (prism-random, titan-random,
#      prov-gigapath-slide-random, fp16 autocast as TRIDENT runs them) over the stores, each time-boxed to
#      SLIDE_BUDGET_S seconds (default 20: the slides it reaches are measured, all 1,000 projected; SLIDE_BUDGET_S=0
#      times all 1,000: ~3-5 min more, then set EVAL_HEADS to fewer heads or SKIP=mil_heads);
#   3. mil_heads: bench/eval_bench.py --device cuda: 5-fold fits of every MIL head's cox variant (EVAL_HEADS; the
#      -nll ones too: EVAL_HEADS="abmil-nll ...") at the CLI's 20 epochs (target <= 2 min per head), its JSON
#      written after each head;
#   4. only when not skipped (they were measured on 2026-11-27: SKIP="" runs them, +3 min): the training tests with
#      CUDA visible (pytest_train_cuda) and bench/train_bench.py (train_bench_gpu).
# Usage: bash bench/gpu_train_eval.sh OUT                      (on the GPU machine, .whl carried)
#        PYTHON=.venv/bin/python bash bench/gpu_train_eval.sh OUT --device cpu   (the dry run: tiny sizes, ~2 min)
# Estimated on one H200 (from the 2026-11-27 run: ABMIL-Cox 61 s, the eval cohort's write 131 s on one core):
# prepare ~2 min, slide_encoders ~1.7 min, mil_heads ~5.5 min (~60-120 s a head; TransMIL's GPU cost is not
# measured yet): ~9.5 min. Heads past CALL_S are cut, the last first (clam-sb-cox: on survival it is ABMIL with
# dropout in the attention); the JSON keeps the heads that ended.
# Where the machine lacks the project's pins, wheels in .whl/ are installed first (bench/gpu_wheels.sh; fetch them
# with `bash bench/gpu_pipeline.sh --fetch-wheels`), and .gpucache/tokenizers.tgz seeds the offline Qwen2 tokenizer
# cache (for part 4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-/tmp/slidecache_gpu}
DEVICE=cuda
if [[ "${2:-}" == "--device" && "${3:-}" == "cpu" ]]; then DEVICE=cpu; fi
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
SCRIPT=gpu_train_eval.sh
source bench/gpu_wheels.sh
ensure_imports 'import zarr, numcodecs, sksurv'
if [ -f .gpucache/tokenizers.tgz ]; then
  mkdir -p /tmp/slidecache_cache && tar xzf .gpucache/tokenizers.tgz -C /tmp/slidecache_cache
  export SLIDECACHE_CACHE=/tmp/slidecache_cache
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"
"$PY" -c 'import sys, torch, transformers, peft, timm, zarr, sksurv; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "timm", timm.__version__, "zarr", zarr.__version__, "sksurv", sksurv.__version__)' \
  | tee -a "$OUT_DIR/gpu.txt" || exit 2

CALL_S=${CALL_S:-585}
WORK=${WORK:-/tmp/slidecache_gpu_work}
SKIP=${SKIP-pytest_train_cuda train_bench_gpu}
EVAL_HEADS=${EVAL_HEADS:-abmil-cox transmil-cox dsmil-cox clam-sb-cox}  # Coxnet runs on the CPU: measured
SLIDE_BUDGET_S=${SLIDE_BUDGET_S:-20}
SLIDE_ENCODERS=${SLIDE_ENCODERS:-prism-random titan-random prov-gigapath-slide-random}
CORES=$(nproc)
if [[ $DEVICE == cpu ]]; then  # the dry run: every step at a tiny size
  EVAL_SIZE="--slides 40 --tiles 32 --dim 64 --epochs 1"
  SLIDE_SIZE="--slides 2 --limit 1 --area-scale 0.02"
  SLIDE_BUDGET_S=0
  WORK=$OUT_DIR/work
else
  EVAL_SIZE=""
  SLIDE_SIZE=""
fi
SLIDE_BOX=$([[ $SLIDE_BUDGET_S != 0 ]] && echo "--budget-s $SLIDE_BUDGET_S")

status=0
left() { echo $((CALL_S - SECONDS)); }
run() {  # name, seconds, command...: each part is bounded, so one slow part leaves time for the next
  local name=$1 seconds=$2; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then return; fi
  if (( seconds < 20 )); then echo "[gpu_train_eval] $name: no time left (CALL_S=$CALL_S)" | tee "$OUT_DIR/$name.log"; status=1; return; fi
  echo "[gpu_train_eval] $name (at most ${seconds} s, ${SECONDS} s in)"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT_DIR/$name.log" || status=1
}
prepare() {  # the two cohorts at once, on every core: nothing timed here is a result (timeout runs it: exported)
  "$PY" bench/eval_bench.py $EVAL_SIZE --cache "$WORK/eval" --prepare-only --workers $(( CORES > 8 ? 4 : 1 )) &
  local eval_pid=$!
  "$PY" bench/slide_encoder_bench.py $SLIDE_SIZE --encoders $SLIDE_ENCODERS --cache "$WORK/slide_encoders" --prepare-only \
    --workers $(( CORES > 8 ? CORES - 4 : CORES ))
  local rc=$?
  wait $eval_pid || rc=1
  return $rc
}
export -f prepare
export PY EVAL_SIZE SLIDE_SIZE SLIDE_ENCODERS WORK CORES
run prepare $(( $(left) < 240 ? $(left) : 240 )) bash -c prepare
run slide_encoders $(( $(left) < 150 ? $(left) : 150 )) "$PY" bench/slide_encoder_bench.py $SLIDE_SIZE \
  --encoders $SLIDE_ENCODERS --cache "$WORK/slide_encoders" --device "$DEVICE" $SLIDE_BOX --json "$OUT_DIR/slide_encoder_bench_$DEVICE.json"
run mil_heads "$(left)" "$PY" bench/eval_bench.py $EVAL_SIZE --cache "$WORK/eval" --device "$DEVICE" \
  --heads $EVAL_HEADS --json "$OUT_DIR/eval_bench_$DEVICE.json"
run pytest_train_cuda 80 "$PY" -m pytest -q -p no:cacheprovider tests/train/test_train_run.py
run train_bench_gpu 90 "$PY" bench/train_bench.py --tiles 16 64 256 --steps 24 --json "$OUT_DIR/train_bench_gpu.json"
echo "[gpu_train_eval] done in ${SECONDS} s (status $status)"
exit $status
