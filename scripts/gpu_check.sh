#!/usr/bin/env bash
# The CUDA checks, one GPU, under 9 minutes in all: three independent parts, each under its own
# time limit, each logged to OUT_DIR, a failed or timed-out part not stopping the next:
#   tests      the CUDA tests (bf16 parity, compiled FlexAttention forward/backward against eager,
#              CUDA-graph decoding against eager tokens, int8, speculative, on-policy), 160 s;
#   benchmark  scripts/benchmark.py on the GPU (batch sizes as on CPU), 210 s; its JSON holds the
#              figures measured so far if the time runs out;
#   2b         scripts/bench_preset.py --preset 2b: prefill and decode tokens/s at 4096 (decode
#              eager and as a CUDA graph), one distillation step's time and peak memory, measured
#              beside gemma2.memory_plan's prediction, 170 s.
# It stops at once (exit 3) where torch sees no GPU or a module the checks need is missing: the
# tests would all be skipped and the part reported as passed. Compiled kernels are cached in
# .cache/inductor, so a second run on the same machine compiles less.
# Runs from the source tree (no install: PYTHONPATH), with the python3 that holds a CUDA torch
# (PYTHON=... to choose another). OUT_DIR/summary.txt says how each part ended.
#
#     bash scripts/gpu_check.sh [OUT_DIR]    # writes gpu.txt, summary.txt, PART.log, benchmark.json, 2b.json
set -uo pipefail
OUT=$(realpath -m "${1:-gpu_check_out}")  # before the cd: a relative OUT_DIR is the caller's
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "error: $OUT is not empty; give a new or empty directory (earlier results are kept)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
if ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "error: $PY's torch sees no CUDA device (a CPU build, or no driver); nothing was checked" | tee "$OUT/summary.txt" >&2
    exit 3
fi
if ! missing=$($PY -c 'import transformers, sentencepiece, safetensors, pytest' 2>&1); then
    echo "error: a module the checks need is missing: ${missing##*$'\n'}" | tee "$OUT/summary.txt" >&2
    exit 3
fi
: >"$OUT/summary.txt"
failed=0

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log it, record how it ended
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=passed ;;
        124 | 137) verdict="TIMED OUT after ${limit} s" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || failed=1
    echo "$name: $verdict in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY -c 'import transformers; print("transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/gpu.txt"
part tests 160 $PY -m pytest -q -rs --durations=15 -m cuda -p no:cacheprovider tests
# The scripts print a failure's whole traceback (gemma2.cli), not only its last line.
part benchmark 210 env GEMMA2_TRACEBACK=1 $PY scripts/benchmark.py --device cuda --json "$OUT/benchmark.json"
part 2b 170 env GEMMA2_TRACEBACK=1 $PY scripts/bench_preset.py --preset 2b --device cuda --seq-len 4096 --json "$OUT/2b.json"
exit $failed
