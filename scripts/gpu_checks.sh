#!/usr/bin/env bash
# GPU checks and benchmarks in one go, for a lent GPU machine (see docs/benchmarks/README.md).
#   OUT=dir bash scripts/gpu_checks.sh tests,numerics,fused,engine,block,profile,load
# Each part writes its log and results under $OUT; a failing part does not stop the others.
set -uo pipefail
OUT=${OUT:-gpu-out}
PARTS=${1:-tests,numerics,fused}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
part() {
  local name=$1; shift
  [[ ",$PARTS," == *",$name,"* ]] || return 0
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
part tests python3 -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_step_padding.py
part numerics python3 scripts/check_gpu_numerics.py --out "$OUT"
part fused python3 scripts/bench_fused.py --out "$OUT"
part engine python3 scripts/bench_engine.py --out "$OUT" --budget-s "${ENGINE_BUDGET_S:-330}"
part block python3 scripts/bench_block_diffusion.py --out "$OUT"
part profile python3 -m dilaserve.cli profile latency --shape llada-8b --device cuda --out "$OUT/profiles"
part load python3 scripts/bench_load.py --out "$OUT/load" --concurrency 1,16,64,256 --rates '' --duration-s 12 --budget-s "${LOAD_BUDGET_S:-400}"
exit 0
