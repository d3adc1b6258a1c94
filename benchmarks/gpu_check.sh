#!/usr/bin/env bash
# One prepared, time-boxed GPU check (issue 12): each stage has its own timeout and writes into
# the output directory as it goes, so a run cut short keeps what it finished.
#   GPU (device tool):  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)
#   CPU smoke:          SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_check_smoke
# Output directory: $1, else $OUT, else /tmp/gpu_check.  The GPU image lacks ml_collections:
# carry it as a wheel (see benchmarks/README.md).  Budget: about 9 minutes in all on one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = "1" ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
STATUS="$OUT_DIR/stages.txt"
: > "$STATUS"

stage() {  # stage NAME SECONDS command...: run with a timeout, log to $OUT_DIR/NAME.log
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s (limit ${seconds}s)" | tee -a "$STATUS"
}

# 1. Device, jax, and the two ceilings (peaks are measured again inside stage 4's table).
stage device 30 bash -c "nvidia-smi || true; $PY -c 'import jax; print(jax.__version__, jax.devices())'"
if [ "$SMOKE" = "1" ]; then
  # 2-5 on CPU: the benchmark code path in interpret mode, tiny shapes (numbers meaningless).
  stage bench_smoke 300 $PY experiments/bench_kernels.py --smoke --out_dir="$OUT_DIR" \
      --variants=bf16_xla,vq_w2 --tokens=8 --nodit_step
  stage calibration_smoke 120 $PY experiments/bench_calibration.py --smoke --steps=2 \
      --warmup=1 --out_dir="$OUT_DIR/calibration"
  echo "smoke: stages 2 (compiled tests) and 5 (DiT-XL/2 step) need a GPU" | tee -a "$STATUS"
  exit 0
fi
# Stages in the order of what the issue needs most, so a run cut short by the call's own time
# limit keeps the most: the timed table (with the correctness pass at the DiT-XL/2 shapes), the
# DiT-XL/2 step, the calibration throughput, then the compiled kernel tests.
# 3 + 4. Correctness at 256 x 1152 x 1152 and 1024 x 4608 x 1152 (stream-K on Hopper) with the
# dispatcher's paths (bench/kernels.CHECK_SHAPES), then the timed table:
# the dispatched variants and the alternatives a decision needs (the XLA decode + dot paths, the
# best tiled launch where the dispatcher chose stream-K, the GEMM alone in Triton and in Mosaic
# GPU) at the DiT-XL/2 shapes and M, speedup over the bf16
# dot, roofline floor.  The earlier LUT-layout kernels (w4a16, w4a8, w4a4, w4a4_e2e,
# act_quant) are not timed here: nothing dispatches them.
GPU_VARIANTS=${GPU_VARIANTS:-bf16_xla,bf16_ln,fp4_w4a16,w4a16_xla,fp4_w4a8,fp4_w4a4,fp4_w4a4_had,fp4_w4a4_ln,vq_w2,vq_w2_dequant_dot,vq_w2_no_stream_k,fp4_w4a16_no_stream_k,vq_w2_splitk_128,fp4_w4a16_splitk_128,gemm_triton_int8,gemm_triton_int8_inloop,gemm_mosaic_int8,gemm_mosaic_fp8}
stage bench_linears 240 $PY experiments/bench_kernels.py --out_dir="$OUT_DIR" --nodit_step \
    --reps=10 --trials=3 --variants="$GPU_VARIANTS"
# 5. One DiT-XL/2 sampling step (256 px, batch 8 with CFG): bf16, VQ W2, HQ-DiT W4A4, W4A8.
stage bench_dit_step 120 $PY experiments/bench_kernels.py --out_dir="$OUT_DIR/dit_step" \
    --nolinears --nocheck --reps=4 --trials=3
# 6. VQ4DiT calibration throughput on DiT-XL/2 (public procedure, W2), extrapolated to 1,000
# and 50,000 steps (the paper: 20 min to 5 h on an A100).
stage calibration 90 $PY experiments/bench_calibration.py --out_dir="$OUT_DIR/calibration" \
    --steps=10 --warmup=2
# 2. The kernel tests, compiled on the GPU (DiT-XL/2 tile configs included), one timeout each.
for test_file in tests/test_kernels_fp4.py tests/test_vq_kernels.py tests/test_kernels.py \
                 tests/test_kernel_integration.py tests/test_dispatch.py; do
  [ -f "$test_file" ] || continue
  stage "test_$(basename "$test_file" .py)" 60 $PY -m pytest -q -x "$test_file"
done
cat "$STATUS"
