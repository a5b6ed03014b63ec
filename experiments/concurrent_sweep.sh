#!/bin/bash
# The MQAR and recall sweeps as a queue of blocks. A block is every run of one (variant, training shape, model,
# d_model): its learning rates x seeds, which the sweep engine trains as ONE program (config.vectorize: the
# step vectorized over the runs, on every local device; docs/experiments.md). WORKERS processes (default 2)
# take blocks from the queue, so that one block compiles on the host while another trains; recall runs in one
# more process. Blocks whose runs all finished before are not queued, once one process has checked that every
# run folder of the grid holds a run of these settings (--config.check_only=True; else the script stops,
# naming the first folder that differs). The whole sweep stops after SECONDS (an interrupted block resumes
# from its runs' checkpoints next time, a finished run is never trained again); then every finished run of
# the workdirs is collected into results.csv, table.md and the figures.
#
#   experiments/concurrent_sweep.sh SECONDS MQAR_WORKDIR RECALL_WORKDIR D_MODEL...
#   VARIANTS="('base','update')" SHAPES='((256,16),(512,64))' RECALL=0 experiments/concurrent_sweep.sh 580 runs/mqar runs/recall 64 128 256
#
# The grid is the config's (CONFIG, default configs/mqar.py: 4 learning rates x 3 seeds, early stop at 0.99,
# its stated budget), narrowed by VARIANTS, SHAPES (its train_shapes), MODELS (a tuple of names), LRS and SEEDS
# when given; EXTRA adds --config flags to every MQAR process (they win over the ones above). RECALL=0 skips
# recall. The queue runs d_model by d_model (as given), then variant, shape and model, so that every GPU slice
# finishes the cheapest blocks first. The tokens/s that the runs record are those of their block's program
# (runs_per_step runs at once) on a device shared with the other processes: use
# benchmarks/training_throughput.py for the throughput of one step alone.
set -u
if [ $# -lt 4 ]; then sed -n 2,21p "$0"; exit 2; fi
BUDGET=$1; export MQAR_DIR=$2; RECALL_DIR=$3; shift 3
export CONFIG=${CONFIG:-configs/mqar.py} EXTRA=${EXTRA:-}
NAMES=(attention linear_attention mamba2 deltanet gated_deltanet bayesian bayesian_no_conv)
export MODELS=${MODELS:-"($(printf "'%s'," "${NAMES[@]}"))"}
export VARIANTS=${VARIANTS:-"('base','shared','update','forget','block')"}
# several processes on one device: each allocates what it uses (not XLA's default 75% of the memory)
[ "${WORKERS:-2}" -gt 1 ] && export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
# One compilation cache for every process (a block's program is compiled once per model, d_model and shape).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-"$MQAR_DIR/jax_cache"}
mkdir -p "$MQAR_DIR/logs" "$RECALL_DIR/logs"

grid() {   # the config's grid flags, narrowed as asked
  echo --config.models="$MODELS" --config.variants="$VARIANTS"
  [ -n "${SHAPES:-}" ] && echo --config.train_shapes="$SHAPES"
  [ -n "${LRS:-}" ] && echo --config.learning_rates="$LRS"
  [ -n "${SEEDS:-}" ] && echo --config.seeds="$SEEDS"
}
mqar() {   # the MQAR app with this script's settings, then the given flags, then EXTRA's
  python -m experiments.mqar --config="$CONFIG" --workdir="$MQAR_DIR" --config.progress=False --config.report=False \
    $(grid) "$@" $EXTRA
}
run_block() {   # d_model variant seq_len pairs model: one block, all its learning rates and seeds
  mqar --config.variants="('$2',)" --config.train_shapes="(($3,$4),)" --config.d_models="($1,)" \
    --config.models="('$5',)" > "$MQAR_DIR/logs/$2_L$3_P$4_d$1_$5.txt" 2>&1
}
export -f grid mqar run_block

# A finished block is not queued below: first make sure that every run folder of the grid holds a run of these
# settings (a changed EXTRA or a workdir of another sweep would otherwise be reported as this sweep's result).
D_MODELS="($(printf '%s,' "$@"))"
mqar --config.d_models="$D_MODELS" --config.check_only=True || exit 1

# the unfinished blocks, from the config's grid as the app resolves it
queue="$MQAR_DIR/logs/queue.txt"
python - "$MQAR_DIR" "$CONFIG" "$D_MODELS" $(grid) $EXTRA > "$queue" <<'EOF' || exit 1
import os, sys
from ml_collections import config_flags
from absl import flags
from experiments import common, mqar
workdir, config_path, d_models, *overrides = sys.argv[1:]
argv = common.last_override_wins(["prog", f"--config={config_path}", f"--config.d_models={d_models}", *overrides])
values = flags.FlagValues()
config_flags.DEFINE_config_file("config", config_path, "", flag_values=values, sys_argv=argv)
values(argv)
config = common.resolve_flags(values)
for d_model in config.d_models:                  # d_model first: every slice finishes the cheap blocks first
    for variant in config.variants:
        for train_set in mqar.training_sets(config, variant):      # the shapes the variant's layout fits
            if train_set.name == mqar.MIXED:
                sys.exit("concurrent_sweep.sh queues fixed training shapes; run a mixed-length config directly.")
            (seq_len, pairs, _), = train_set.parts
            for model in config.models:
                folders = [mqar.run_dir(workdir, variant, model, train_set.name, d_model, lr, seed)
                           for lr in config.learning_rates for seed in config.seeds]
                if not all(os.path.exists(os.path.join(f, "results.json")) for f in folders):
                    print(d_model, variant, seq_len, pairs, model)
EOF
echo "$(wc -l < "$queue") MQAR blocks to do, ${WORKERS:-2} at a time (queue: $queue)"

[ "${RECALL:-1}" = 1 ] && timeout "$BUDGET" python -m experiments.recall --config=configs/recall.py \
  --workdir="$RECALL_DIR" --config.progress=False --config.models="$MODELS" \
  > "$RECALL_DIR/logs/recall.txt" 2>&1 &
timeout "$BUDGET" xargs -P "${WORKERS:-2}" -L 1 bash -c 'run_block "$@"' _ < "$queue"
wait
python -c "import sys; from experiments import mqar; mqar.report(sys.argv[1])" "$MQAR_DIR"
python -c "import sys; from experiments import recall; recall.report(sys.argv[1])" "$RECALL_DIR"
