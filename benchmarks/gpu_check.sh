#!/usr/bin/env bash
# The one prepared GPU call: build in place against the machine's torch, run the CUDA tests, run a short
# benchmark.  Under 5 minutes on an H100/H200.  Logs go to $OUT (set by the device tool) or ./gpu_check_out.
#   device run:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -1; } \
  2>&1 | tee "$OUT/env.log"

echo "== build (ptxas -v: registers and spills per kernel)"
if ! (time SCE_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -v -e .) > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "softmax_ce_ext build|real" "$OUT/build.log"
grep -E "bytes spill" "$OUT/build.log" | sort | uniq -c | sed 's/^/  /' | head -20

echo "== CUDA tests"
timeout 300 $PY -m pytest -q -p no:cacheprovider -k "cuda" tests 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark (every kernel, checked against float64; then torch.compile on the LLM shape)"
# Peers: Liger is not on the GPU image; carry it as a wheel in .whl (see the device README) to include it.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
timeout 150 $PY benchmarks/bench.py --device cuda --no-progress --shapes llm classification segmentation \
  --dtype bfloat16 float32 --mode fwd fwd+bwd none+bwd --providers ours torch liger flash_attn \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 90 $PY benchmarks/bench.py --device cuda --no-progress --shapes 8192x128256 --dtype bfloat16 \
  --mode fwd fwd+bwd --providers compile --json "$OUT/bench_compile.json" 2>&1 | tee "$OUT/bench_compile.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
