#!/usr/bin/env bash
# One call on a lent GPU machine checks and times everything (see /work/.library/device).
# Needs ml_collections carried as a wheel (the GPU image lacks it):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
# then: run(command="bash benchmarks/run_gpu.sh", carry=[".whl"]).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi | tee "$OUT/nvidia-smi.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/jax.txt"
# 1. The kernel tests, compiled (interpret=False on a GPU), and the model-level dispatch.
python3 -m pytest -q tests/test_kernels.py tests/test_kernel_integration.py 2>&1 | tee "$OUT/tests.log"
# 2. Correctness pass + all kernel timings + the DiT-XL/2 step, into benchmarks/.
python3 experiments/bench_kernels.py --out_dir="$OUT" 2>&1 | tee "$OUT/bench.log" | grep -vE "^I[0-9]{4}"
cp "$OUT"/kernels_*.md benchmarks/ 2>/dev/null || true
