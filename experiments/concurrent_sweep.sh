#!/bin/bash
# The MQAR and recall sweeps as several processes sharing one accelerator. Small models leave a GPU
# mostly idle and spend much of a run compiling on the host, so WORKERS processes (default 8) take the
# runs of the grid from one queue, one run per process, plus one process for recall. Runs that finished
# before are not queued, once one process has checked that every run folder of the grid holds a run of
# these settings (--config.check_only=True; else the script stops, naming the first folder that differs).
# The whole sweep stops after SECONDS (an interrupted run resumes from its checkpoint next time); then
# every finished run of the workdirs is collected into results.csv, table.md and the figures. The tokens/s that the runs record are measured on a shared device: use
# benchmarks/training_throughput.py for throughput.
#
#   experiments/concurrent_sweep.sh SECONDS MQAR_WORKDIR RECALL_WORKDIR D_MODEL...
#   WORKERS=12 LRS='(1e-2,)' experiments/concurrent_sweep.sh 500 runs/mqar runs/recall 128 256
#
# The MQAR grid: d_model x variant x training shape $SHAPES (default "((128,8),)") x learning rate $LRS
# (default "(2.2e-3,1e-2)") x model, in that order, 1,000 steps, evaluated at the training shape and at
# twice the length and pairs. RECALL=0 skips recall; EXTRA adds --config flags to every MQAR run (they
# win over the ones above). The queue's order makes the first wave compile different models and the
# later runs of a model load its step from the shared compilation cache. WORKERS bounds the processes
# whose steps' temporaries must fit the GPU together, and the GPU time-slices between processes: on an H200
# at d_model 512 ten processes together got about half the throughput of one run alone, so use 3-5 there;
# at d_model 64, where compiling dominates, 8 (docs/results/mqar/README.md).
set -u
if [ $# -lt 4 ]; then sed -n 2,21p "$0"; exit 2; fi
export SHAPES=${SHAPES:-"((128,8),)"} LRS=${LRS:-"(2.2e-3,1e-2)"} EXTRA=${EXTRA:-}
BUDGET=$1; export MQAR_DIR=$2; RECALL_DIR=$3; shift 3
NAMES=(bayesian bayesian_no_conv gated_deltanet deltanet mamba2 linear_attention attention)
MODELS="($(printf "'%s'," "${NAMES[@]}"))"
# One compilation cache for every process: the variants and learning rates of a model and d_model share
# one compiled step (the learning rate is not compiled in).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-"$MQAR_DIR/jax_cache"}
mkdir -p "$MQAR_DIR/logs" "$RECALL_DIR/logs"

mqar() {   # the MQAR app with this script's settings, then the given flags, then EXTRA's
  python -m experiments.mqar --config=configs/mqar.py --workdir="$MQAR_DIR" --config.progress=False --config.report=False \
    --config.num_steps=1000 --config.warmup_steps=100 --config.num_train_examples=50000 \
    --config.eval_multipliers='((1,1),(2,2))' --config.backend=chunked "$@" $EXTRA
}
run_one() {   # d_model variant seq_len pairs lr model
  mqar --config.variants="('$2',)" --config.train_shapes="(($3,$4),)" --config.d_models="($1,)" \
    --config.learning_rates="($5,)" --config.models="('$6',)" > "$MQAR_DIR/logs/$2_L$3_P$4_d$1_lr$5_$6.txt" 2>&1
}
export -f mqar run_one

# A finished run is not queued below: first make sure that every run folder of the grid holds a run of these
# settings (a changed EXTRA or a workdir of another sweep would otherwise be reported as this sweep's result).
D_MODELS="($(printf '%s,' "$@"))"
mqar --config.variants="('base','shared','update','block')" --config.train_shapes="$SHAPES" \
  --config.d_models="$D_MODELS" --config.learning_rates="$LRS" --config.models="$MODELS" \
  --config.check_only=True || exit 1

queue="$MQAR_DIR/logs/queue.txt"
: > "$queue"
for d in "$@"; do
  for variant in base shared update block; do
    for shape in $(echo "$SHAPES" | tr -d ' ' | grep -o '([0-9]*,[0-9]*)' | tr -d '()' | tr ',' '_'); do
      L=${shape%_*}; P=${shape#*_}
      for lr in $(echo "$LRS" | tr -d '() ' | tr ',' ' '); do
        for model in "${NAMES[@]}"; do
          folder="$MQAR_DIR/runs/$variant/$model/L${L}_P${P}/d${d}_lr$(printf '%.2e' "$lr")"
          [ -f "$folder/results.json" ] || echo "$d $variant $L $P $lr $model" >> "$queue"
        done
      done
    done
  done
done
echo "$(wc -l < "$queue") MQAR runs to do, ${WORKERS:-8} at a time (queue: $queue)"

[ "${RECALL:-1}" = 1 ] && timeout "$BUDGET" python -m experiments.recall --config=configs/recall.py \
  --workdir="$RECALL_DIR" --config.progress=False --config.backend=chunked \
  --config.models="$MODELS" \
  > "$RECALL_DIR/logs/recall.txt" 2>&1 &
timeout "$BUDGET" xargs -P "${WORKERS:-8}" -L 1 bash -c 'run_one "$@"' _ < "$queue"
wait
python -c "import sys; from experiments import mqar; mqar.report(sys.argv[1])" "$MQAR_DIR"
python -c "import sys; from experiments import recall; recall.report(sys.argv[1])" "$RECALL_DIR"
