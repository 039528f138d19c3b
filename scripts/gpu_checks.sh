#!/usr/bin/env bash
# GPU checks and benchmarks in one go, for a lent GPU machine (see docs/benchmarks/README.md).
#   OUT=dir bash scripts/gpu_checks.sh tests,smoke,numerics,fused,engine,block,profile,load
#   OUT=dir FAST_DLLM_DIR=Fast-dLLM/llada bash scripts/gpu_checks.sh fast-dllm,engine   # #8 against Fast-dLLM, same device
#   OUT=dir bash scripts/gpu_checks.sh load-steps      # #9's 4-tokens-per-step workload: block vs block_phase_mixed
#   OUT=dir bash scripts/gpu_checks.sh sparse          # #14: long-context reuse steps, dense vs kv_retention 0.5 (H200: batch 32 x 4096 needs ~96 GiB of KV)
#   OUT=dir bash scripts/gpu_checks.sh sdar-profile,sdar-load   # #12: the block-causal (SDAR-8B shape) case
#   OUT=dir bash scripts/gpu_checks.sh tp,tp-profile   # #10: needs 2 GPUs (tp-serve also needs Ray's wheels)
#   OUT=dir bash scripts/gpu_checks.sh large-gemms,engine-steps,numerics-variants   # large steps' matmul options
#   OUT=dir bash scripts/gpu_checks.sh swiglu-steps,composed-numerics,composed-engine,engine   # the one-kernel SwiGLU (the default) against cuBLAS + silu_mul
# Each part writes its log and results under $OUT; a failing part does not stop the others.
set -uo pipefail
OUT=${OUT:-gpu-out}
PARTS=${1:-tests,smoke,numerics,fused}
[[ ",$PARTS," == *",sparse,"* ]] && PARTS="$PARTS,sparse-profile,sparse-profile-kv,sparse-load,sparse-load-kv"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
part() {
  local name=$1; shift
  [[ ",$PARTS," == *",$name,"* ]] || return 0
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "${PART_TIMEOUT_S:-1800}" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}
part tests python3 -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_step_padding.py
part smoke python3 scripts/profile_step.py --tiny --out "$OUT/smoke"  # the GPU-only scripts on a toy model
part numerics python3 scripts/check_gpu_numerics.py --out "$OUT"
part numerics-variants bash -c 'for v in ${NUMERICS_VARIANTS:-default all}; do python3 scripts/check_gpu_numerics.py --logits-only --variant $v; done'
part fused python3 scripts/bench_fused.py --out "$OUT"
part large-gemms python3 scripts/sweep_large_gemms.py --out "$OUT"
part engine-steps python3 scripts/profile_engine_steps.py --out "$OUT" --variants "${ENGINE_STEPS_VARIANTS:-default,composed,bf16-qkv,all}"
# The interleaved TMA SwiGLU kernel with 8192-row MLP slices (the default since 2026-12-06): c=64 steps
# against cuBLAS + silu_mul (composed, the default before) on one engine each; the composed path's logits error and #8's
# table for it (the engine part gives the default's)
part swiglu-steps python3 scripts/profile_engine_steps.py --out "$OUT/swiglu" --profile-steps 0 \
  --variants default,composed,swiglu-il-2048
part composed-numerics python3 scripts/check_gpu_numerics.py --logits-only --variant composed
part composed-engine python3 scripts/bench_engine.py --out "$OUT/composed" --paths triton --variant composed \
  --budget-s "${ENGINE_BUDGET_S:-330}"
# #8's baseline: Fast-dLLM's published dual cache, one request at a time, on this device (FAST_DLLM_DIR:
# its llada/ folder; needs einops); the engine part then divides by it
part fast-dllm python3 scripts/bench_fast_dllm.py --fast-dllm "${FAST_DLLM_DIR:-.fastdllm/llada}" --out "$OUT/fast-dllm"
fd_json=$(ls "$OUT"/fast-dllm/fast_dllm_*.json 2>/dev/null | head -n 1)
part engine python3 scripts/bench_engine.py --out "$OUT" --budget-s "${ENGINE_BUDGET_S:-330}" \
  ${fd_json:+--fast-dllm-result "$fd_json"}
part block python3 scripts/bench_block_diffusion.py --out "$OUT"
part profile python3 -m dilaserve.cli profile latency --shape llada-8b --device cuda --out "$OUT/profiles"
part load python3 scripts/bench_load.py --out "$OUT/load" --concurrency 1,16,64,256 --rates '' --duration-s 12 --budget-s "${LOAD_BUDGET_S:-400}"
# #9 at 4 tokens per step (fixed steps): throughput at c=64 vs dLLM-Serve, and phase-mixed vs unbounded refreshes
part load-steps python3 scripts/bench_load.py --out "$OUT/load-steps" --steps-per-block 8 --concurrency 1,16,64,256 \
  --rates auto --duration-s 20 --budget-s "${LOAD_STEPS_BUDGET_S:-420}"
part sdar-profile python3 -m dilaserve.cli profile latency --shape sdar-8b --device cuda --batch-sizes 1,8,32,64 \
  --chunks 1,2,4 --block-size 4 --contexts 512,1024 --out "$OUT/profiles-sdar"
part sdar-load python3 scripts/bench_load.py --shape sdar-8b --out "$OUT/load-sdar" --concurrency 1,16,64 --rates '' \
  --duration-s 10 --budget-s "${SDAR_LOAD_BUDGET_S:-240}"
part sparse-profile python3 -m dilaserve.cli profile latency --shape llada-8b --device cuda --phases refresh,reuse \
  --batch-sizes 1,8,32 --chunks 32 --contexts 2048,4096 --out "$OUT/profiles-dense"
part sparse-profile-kv python3 -m dilaserve.cli profile latency --shape llada-8b --device cuda --phases refresh,reuse \
  --batch-sizes 1,8,32 --chunks 32 --contexts 2048,4096 --kv-retention 0.5 --out "$OUT/profiles-kv0.5"
part sparse-load python3 scripts/bench_load.py --out "$OUT/load-long" --prompt-len 2048 --modes block \
  --concurrency 1,16,64 --rates '' --duration-s 10 --budget-s 200
part sparse-load-kv python3 scripts/bench_load.py --out "$OUT/load-long" --prompt-len 2048 --modes block \
  --concurrency 1,16,64 --rates '' --duration-s 10 --budget-s 200 --kv-retention 0.5 --sparse-scratch-tokens 16384
part tp python3 scripts/bench_tensor_parallel.py --out "$OUT/tp" --degree 2 --concurrency 1,8,32,128
part tp-profile python3 -m dilaserve.cli profile latency --shape llada-8b --device cuda --tensor-parallel 1,2 \
  --batch-sizes 1,8,32 --chunks 32 --contexts 512,1024 --out "$OUT/profiles-tp"
part tp-serve python3 scripts/serve_tp_check.py --tensor-parallel 2 --device cuda --out "$OUT/tp"
exit 0
