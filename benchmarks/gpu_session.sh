#!/bin/bash
# Everything the GPU kernels need measured, in one call of the lent H200 (device README: carry .whl with
# the wheels fla-core 0.6.0 and ml_collections, and .cache if an earlier call saved one):
#
#   benchmarks/gpu_session.sh OUT_DIR [SECONDS]
#
# 1. installs the carried wheels into /tmp/site;
# 2. restores the compilation caches from .cache/caches.tgz if present (Triton's, with fla's autotuning
#    results: fla's first call autotunes for 70-150 s per op and shape without it; and JAX's);
# 3. runs the Pallas tests on the GPU (tests/test_pallas.py: the kernels for real against float64
#    recurrences);
# 4. times every kernel alone and sweeps the delta rule's launch settings;
# 5. runs benchmarks/gpu_kernels.py: every model at 4x4096x16x128, then the other two shapes;
# 6. saves the caches into OUT_DIR/caches.tgz (copy it to .cache/ for the next call) and stops at
#    SECONDS (default 540), keeping what was measured (each step writes its files as it goes).
set -u
if [ $# -lt 1 ]; then sed -n 2,15p "$0"; exit 2; fi
OUT_DIR=$1; BUDGET=${2:-540}; START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/caches/triton JAX_COMPILATION_CACHE_DIR=/tmp/caches/jax
mkdir -p /tmp/caches && [ -f .cache/caches.tgz ] && tar -xzf .cache/caches.tgz -C /tmp/caches
save() { tar -czf "$OUT_DIR/caches.tgz" -C /tmp/caches . 2>/dev/null; }
trap save EXIT
timeout $(( $(left) > 120 ? 120 : $(left) )) python3 -m pytest -q -x -p no:cacheprovider tests/test_pallas.py \
    -k "reference or without_the_interpreter or float64 or bf16" 2>&1 | tail -3 | tee "$OUT_DIR/tests.txt"
timeout $(( $(left) > 90 ? 90 : $(left) )) python3 benchmarks/profile_kernels.py --time > "$OUT_DIR/kernels.jsonl" 2>&1
timeout $(( $(left) > 150 ? 150 : $(left) )) python3 benchmarks/gpu_kernels.py --sweep --shapes 4x4096x16x128 \
    --repeats 10 > "$OUT_DIR/sweep.jsonl" 2>&1
timeout $(( $(left) - 20 )) python3 benchmarks/gpu_kernels.py --shapes 4x4096x16x128 --backends pallas,chunked \
    --out "$OUT_DIR/gpu_kernels.md" --json "$OUT_DIR/gpu_kernels.jsonl" 2>&1 | grep -v -i deprecat | tail -3
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 15 )) python3 benchmarks/gpu_kernels.py \
    --shapes 8x2048x32x64,1x32768x8x128 --oracle none --out "$OUT_DIR/gpu_kernels_shapes.md" \
    --json "$OUT_DIR/gpu_kernels_shapes.jsonl" 2>&1 | grep -v -i deprecat | tail -3
exit 0
