#!/bin/bash
# Everything the GPU kernels need measured, in a few calls of the lent H200 (device README: carry .whl
# with the wheels fla-core 0.6.0 and ml_collections, and .cache if an earlier call saved one):
#
#   benchmarks/gpu_session.sh OUT_DIR [SECONDS] [PHASES]
#
# PHASES (default "tests,kernels,headline"; a call has 600 s, fla autotunes 70-150 s per op and shape
# on its first call, so give the phases to two or three calls, carrying the caches between them):
#   tests      tests/test_pallas.py on the GPU (the kernels for real against float64 recurrences)
#   covtests   only its covariance tests (the covariance kernels, forward and backward)
#   vmap       tests/test_pallas_vmap.py on the GPU (the kernels vectorized over runs, as the sweep engine
#              trains the MQAR and recall blocks, against each run alone)
#   reference  benchmarks/fla_reference.py: fla's own outputs for tests/test_fla.py (copy the .npz to
#              tests/data/fla_reference.npz and commit it)
#   kernels    every kernel alone (the GLA ones included), the covariance pass in several of its forms
#              (other launch settings for any phase: MBD_PALLAS_TUNING, filters/pallas/common.py)
#   variants   the kernels in $KERNELS (default: the covariance passes, GLA's attention, output and chunk
#              backward, the delta rule's prepare) alone under each launch setting or form of $VARIANTS (a JSON list of TUNING dicts),
#              at $SHAPE (default 4x4096x16x128; the MQAR training step's is 256x128x8x64)
#   sweep      the delta rule's launch settings
#   headline   benchmarks/gpu_kernels.py, every model at 4x4096x16x128 beside fla (and MesaNet; $MODELS,
#              $BACKENDS and $ORACLE narrow it)
#   bayesian   the Bayesian Layer at 4x4096x16x128 with its error against float64, its covariance
#              checkpoints rerun in the backward pass then kept from the forward, Gated DeltaNet beside it,
#              then bayesian_key (noise along the key) through the kernels and the chunked form
#   kda        the delta rule with a channel-wise decay (KDA-style) at 4x4096x16x128: its kernels, its
#              chunked form and fla's chunk_kda, with the error against float64 (`auto` takes the kernels
#              once they are measured faster than the chunked form: filters/pallas/lowering.py)
#   shapes     the other two shapes (8x2048x32x64, 1x32768x8x128; $SHAPES: one of them per call, as fla
#              autotunes every op anew at each)
#   training   the MQAR training step at d_model 512 (benchmarks/training_throughput.py; $TRAIN_MODELS)
#   profile    Nsight Compute on the kernels that miss their targets (registers, occupancy, spills, pipes;
#              $NCU_KERNELS: which of them)
#   trees      one model ($TREE_MODEL, default bayesian; pallas, no peers, median of 10) at the headline
#              shape in each older tree, two rounds (A B A B), carried as .device/tree_NAME.tgz, each with its own benchmarks
#              (to bisect a regression on one machine; make them here with
#              `git archive --format=tar REV -- filters designmodels layers benchmarks experiments configs
#              pyproject.toml | gzip > .device/tree_REV.tgz`, .device listed in .git/info/exclude, and carry
#              .device); the records go to OUT_DIR/tree_NAME.jsonl
# It installs the carried wheels into /tmp/site, restores fla's autotuning results from
# .cache/caches.tgz.* if present, else from benchmarks/fla_autotune_h200.tgz (committed: what the calls up to
# 2026-12-02, evening, autotuned, fla 0.6.0 on Triton 3.6: the headline shape's GLA, KDA, simple GLA, DeltaNet,
# Gated DeltaNet and MesaNet ops, and the shapes 8x2048x32x64 and 1x32768x8x128; each op and shape
# autotuned anew costs 70-140 s of device time), and saves them into OUT_DIR/caches.tgz.00, .01,
# ... (parts of 15 MB: the device returns files up to 16 MB; copy them to .cache/ for the next call, and
# over benchmarks/fla_autotune_h200.tgz when it holds more: Triton keys them by op, shape and version). Only Triton's
# *.autotune.json files are kept: with the compiled kernels and JAX's cache the caches grew to 420 MB
# (2026-12-01), more than a call returns; the autotuned configuration recompiles in seconds. It stops at
# SECONDS (default 540), keeping what was measured (each step writes its files as it goes).
set -u
if [ $# -lt 1 ]; then sed -n '2,/^set -u$/{/^set -u$/!p}' "$0"; exit 2; fi
OUT_DIR=$1; BUDGET=${2:-540}; PHASES=,${3:-tests,kernels,headline},; START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
want() { [[ $PHASES == *,$1,* ]] && [ "$(left)" -gt 30 ]; }
cap() { local l; l=$(left); echo $(( $1 < l - 15 ? $1 : l - 15 )); }
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 FLA_CACHE_RESULTS=1
export TRITON_CACHE_DIR=/tmp/caches/triton JAX_COMPILATION_CACHE_DIR=/tmp/caches/jax
mkdir -p /tmp/caches
if ls .cache/caches.tgz.* >/dev/null 2>&1; then cat .cache/caches.tgz.* | tar -xz -C /tmp/caches
else tar -xzf benchmarks/fla_autotune_h200.tgz -C /tmp/caches; fi
save() { (cd /tmp/caches && find . -name '*.autotune.json' | tar -cz -T - 2>/dev/null) | split -b 15M -d - "$OUT_DIR/caches.tgz."; }
trap save EXIT
# On a GPU every kernel test of test_pallas.py compiles the kernels for real (no interpreter).
want tests && timeout "$(cap 240)" python3 -m pytest -q -p no:cacheprovider tests/test_pallas.py \
    tests/test_packed.py -k "pallas" 2>&1 | tail -4 | tee "$OUT_DIR/tests.txt"
want covtests && timeout "$(cap 200)" python3 -m pytest -q -p no:cacheprovider tests/test_pallas.py -k covariance \
    2>&1 | tail -4 | tee "$OUT_DIR/covtests.txt"
want vmap && timeout "$(cap 240)" python3 -m pytest -q -p no:cacheprovider tests/test_pallas_vmap.py \
    2>&1 | tail -4 | tee "$OUT_DIR/vmap.txt"
want reference && timeout "$(cap 240)" python3 benchmarks/fla_reference.py --out "$OUT_DIR/fla_reference.npz" \
    2>&1 | tail -3
if want kernels; then
    timeout "$(cap 90)" python3 benchmarks/profile_kernels.py --time > "$OUT_DIR/kernels.jsonl" 2>&1
    # The covariance kernel's forms (filters/pallas/covariance.py: TF32x3 and IEEE products, P in registers
    # or through memory, one or two loops), each with its error against float64.
    timeout "$(cap 150)" python3 benchmarks/profile_kernels.py --time --kernels covariance_pass,covariance_pass_ieee \
        --variants '[{}, {"covariance_pass": {"num_warps": 4}, "covariance_pass_ieee": {"carry": "registers"}},
                     {"covariance_pass": {"carry": "memory", "factor": "one_loop"},
                      "covariance_pass_ieee": {"factor": "two_loops"}}]' > "$OUT_DIR/covariance.jsonl" 2>&1
fi
# The forms in TUNING beside the defaults (GLA's column-wise diagonal, slower on 2026-12-02; the
# covariance passes' one-loop factor, within noise), to confirm or revisit a default; the covariance
# passes on 4 warps (the training step's K = 64 may favour fewer).
DEFAULT_VARIANTS='[{}, {"gla_output": {"diagonal": "columns"}, "covariance_pass": {"factor": "one_loop"}},
                   {"covariance_pass": {"num_warps": 4}, "covariance_pass_backward": {"num_warps": 4}}]'
want variants && timeout "$(cap 240)" python3 benchmarks/profile_kernels.py --time --shape "${SHAPE:-4x4096x16x128}" \
    --kernels "${KERNELS:-covariance_pass,covariance_pass_backward,gla_attention,gla_output,gla_chunk_backward,delta_rule_prepare}" \
    --variants "${VARIANTS:-$DEFAULT_VARIANTS}" > "$OUT_DIR/variants.jsonl" 2>&1
want sweep && timeout "$(cap 150)" python3 benchmarks/gpu_kernels.py --sweep --shapes 4x4096x16x128 \
    --repeats 10 > "$OUT_DIR/sweep.jsonl" 2>&1
want headline && timeout "$(cap 480)" python3 benchmarks/gpu_kernels.py --shapes 4x4096x16x128 \
    ${MODELS:+--models "$MODELS"} --backends "${BACKENDS:-pallas,chunked}" ${ORACLE:+--oracle "$ORACLE"} --out "$OUT_DIR/gpu_kernels.md" --json "$OUT_DIR/gpu_kernels.jsonl" 2>&1 \
    | grep -v -i deprecat | tail -3
if want bayesian; then
    # the covariance checkpoints rerun in the backward pass (default) or kept from the forward pass
    for keep in rerun forward; do
        MBD_PALLAS_TUNING="{\"covariance_pass_backward\": {\"checkpoints\": \"$keep\"}}" timeout "$(cap 200)" \
            python3 benchmarks/gpu_kernels.py --shapes 4x4096x16x128 --models bayesian --backends pallas \
            --peers none --oracle 4x4096x16x128 --repeats 10 --json "$OUT_DIR/bayesian_checkpoints_$keep.jsonl" 2>&1 \
            | grep -v -i deprecat | tail -2
        [ $keep = rerun ] && timeout "$(cap 120)" python3 benchmarks/gpu_kernels.py --shapes 4x4096x16x128 \
            --models gated_deltanet --backends pallas --peers fla --oracle none --repeats 10 \
            --json "$OUT_DIR/gated_deltanet.jsonl" 2>&1 | grep -v -i deprecat | tail -2
    done
    # noise along the key (bayesian_key): its kernels beside its chunked form
    timeout "$(cap 200)" python3 benchmarks/gpu_kernels.py --shapes 4x4096x16x128 --models bayesian_key \
        --backends pallas,chunked --peers none --oracle 4x4096x16x128 --repeats 10 \
        --json "$OUT_DIR/bayesian_key.jsonl" 2>&1 | grep -v -i deprecat | tail -2
fi
want kda && timeout "$(cap 300)" python3 benchmarks/gpu_kernels.py --shapes 4x4096x16x128 --models kda \
    --backends pallas,chunked --peers fla --oracle 4x4096x16x128 --repeats 10 --json "$OUT_DIR/kda.jsonl" 2>&1 \
    | grep -v -i deprecat | tail -3
want shapes && timeout "$(cap 540)" python3 benchmarks/gpu_kernels.py --shapes "${SHAPES:-8x2048x32x64,1x32768x8x128}" \
    ${MODELS:+--models "$MODELS"} --backends "${BACKENDS:-pallas,chunked}" \
    --oracle none --out "$OUT_DIR/gpu_kernels_shapes.md" --json "$OUT_DIR/gpu_kernels_shapes.jsonl" 2>&1 \
    | grep -v -i deprecat | tail -3
want training && timeout "$(cap 300)" python3 benchmarks/training_throughput.py --d-models 512 \
    --models "${TRAIN_MODELS:-mamba2,deltanet,gated_deltanet,bayesian}" --backends "${BACKENDS:-pallas,chunked}" \
    --out "$OUT_DIR/training_throughput.md" 2>&1 | tail -3
if want trees; then
    # Two rounds over the trees (A B A B: a drift of the GPU's clocks over the call, seen 2026-12-02, weighs
    # on each tree alike); both rounds' records go to the tree's file.
    for tree in .device/tree_*.tgz .device/tree_*.tgz; do
        [ -f "$tree" ] && [ "$(left)" -gt 60 ] || continue
        name=$(basename "$tree" .tgz); dir=/tmp/$name
        [ -d "$dir" ] || { mkdir -p "$dir" && tar -xzf "$tree" -C "$dir"; }
        (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout "$(cap 90)" python3 benchmarks/gpu_kernels.py \
            --shapes 4x4096x16x128 --models "${TREE_MODEL:-bayesian}" --backends pallas --peers none --oracle none \
            --repeats 10 --json "$OUT_DIR/$name.jsonl" 2>&1 | grep -v -i deprecat | tail -1)
    done
fi
# NCU_KERNELS narrows it (ncu replays every section's passes per launch: four kernels did not all fit in 240 s).
PROFILED=${NCU_KERNELS:-gla_attention,gla_chunk_backward,covariance_pass,delta_rule_prepare}
want profile && timeout "$(cap 240)" ncu --clock-control none -k regex:"${PROFILED//,/|}" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    python3 benchmarks/profile_kernels.py --kernels "$PROFILED" > "$OUT_DIR/ncu.txt" 2>&1
exit 0
