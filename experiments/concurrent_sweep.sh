#!/bin/bash
# The MQAR and recall sweeps as several processes sharing one accelerator: small models leave a GPU
# mostly idle and spend much of a run compiling on the host, so one process per MQAR variant and d_model
# (plus one for recall) keeps the device and the host cores busy where one process would not. Each
# process stops after SECONDS (its unfinished run resumes from its checkpoint next time); then every
# finished run of the workdirs is collected into results.csv, table.md and the figures. The tokens/s that the runs record are
# then measured on a shared device: use benchmarks/training_throughput.py for throughput.
#
#   experiments/concurrent_sweep.sh SECONDS MQAR_WORKDIR RECALL_WORKDIR D_MODEL...
#   experiments/concurrent_sweep.sh 500 runs/mqar runs/recall 64 128
#
# The MQAR grid: training shapes $SHAPES (default "((128,8),)"), learning rates $LRS (default
# "(2.2e-3,1e-2)"), 1,000 steps, evaluated at the training shape and at twice the length and pairs.
# RECALL=0 skips the recall process. Size the machine: 4 x (number of d_models) + 1 processes compile
# at once, and their steps' temporaries must fit the GPU together (on the H200, nineteen processes,
# fifteen at d_model 256, ran out of memory: single allocations of up to 5.6 GiB).
set -u
if [ $# -lt 4 ]; then sed -n 2,16p "$0"; exit 2; fi
SHAPES=${SHAPES:-"((128,8),)"}; LRS=${LRS:-"(2.2e-3,1e-2)"}
BUDGET=$1; MQAR_DIR=$2; RECALL_DIR=$3; shift 3
NAMES=(bayesian bayesian_no_conv gated_deltanet deltanet mamba2 linear_attention attention)
as_tuple() { local out="(" n; for n in "$@"; do out+="'$n',"; done; echo "$out)"; }
MODELS=$(as_tuple "${NAMES[@]}")
# One compilation cache for every process: the variants train the same models at the same shapes, and
# each process starts at a different model (the list rotated by 2), so a step compiled by one is a
# cache hit for the others when they reach that model.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-"$MQAR_DIR/jax_cache"}
mkdir -p "$MQAR_DIR/logs" "$RECALL_DIR/logs"
offset=0
for variant in base shared update block; do
  ROTATED=$(as_tuple "${NAMES[@]:offset}" "${NAMES[@]:0:offset}")
  offset=$((offset + 2))
  for d in "$@"; do
    timeout "$BUDGET" python -m experiments.mqar --config=configs/mqar.py --workdir="$MQAR_DIR" \
      --config.progress=False --config.variants="('$variant',)" --config.train_shapes="$SHAPES" \
      --config.d_models="($d,)" --config.learning_rates="$LRS" --config.num_steps=1000 \
      --config.warmup_steps=100 --config.num_train_examples=50000 --config.eval_multipliers='((1,1),(2,2))' \
      --config.backend=chunked --config.models="$ROTATED" > "$MQAR_DIR/logs/${variant}_d$d.txt" 2>&1 &
  done
done
[ "${RECALL:-1}" = 1 ] && timeout "$BUDGET" python -m experiments.recall --config=configs/recall.py --workdir="$RECALL_DIR" \
  --config.progress=False --config.backend=chunked --config.models="$MODELS" > "$RECALL_DIR/logs/recall.txt" 2>&1 &
wait
python -c "import sys; from experiments import mqar; mqar.report(sys.argv[1])" "$MQAR_DIR"
python -c "import sys; from experiments import recall; recall.report(sys.argv[1])" "$RECALL_DIR"
