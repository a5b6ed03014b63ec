#!/bin/bash
# One slice of a sweep on a lent machine whose disk does not outlive the call (the device tool: a fresh
# machine each call, up to 600 s, files come back only from $OUT, at most 16 MB each):
#
#   experiments/gpu_slice.sh OUT_DIR ARCHIVE COMMAND...
#   experiments/gpu_slice.sh $OUT docs/results/mqar/runs.tgz \
#       env VARIANTS="('base','update')" SHAPES='((256,16),(512,64))' RECALL=0 \
#       experiments/concurrent_sweep.sh 520 runs/mqar runs/recall 64
#
# 1. installs the carried wheels (.whl/*.whl, e.g. ml_collections, which the GPU image lacks) into /tmp/site;
# 2. unpacks ARCHIVE (the run folders of the slices before, tracked in git, so it travels with the tree)
#    into the working tree: finished runs are skipped by the sweep (their results.json);
# 3. runs COMMAND (give it a budget that leaves about 40 s for the rest: packing is quick);
# 4. packs every run folder under runs/ (records, metrics, reports; no checkpoints, no compilation cache)
#    into OUT_DIR/runs.tgz: copy it over ARCHIVE here and commit it (`tar -tzf` lists what came back).
# Checkpoints do not come back (a block's 12 runs hold hundreds of MB of parameters and optimizer state),
# so a run that the slice's end interrupts starts again in a later slice: size the blocks to finish in a
# slice (EXTRA='--config.block_runs=4' splits a block of 12 runs into 3 programs of 4, run one after the
# other; each writes its runs' records when it finishes).
set -u
if [ $# -lt 3 ]; then sed -n 2,19p "$0"; exit 2; fi
OUT_DIR=$1; ARCHIVE=$2; shift 2
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
[ -f "$ARCHIVE" ] && tar -xzf "$ARCHIVE"
echo "restored $(find runs -name results.json 2>/dev/null | wc -l) finished runs from $ARCHIVE"
"$@"
status=$?
find runs -type d \( -name checkpoints -o -name jax_cache \) -prune -o -type f -print 2>/dev/null \
    | tar -czf "$OUT_DIR/runs.tgz" -T -
echo "packed $(find runs -name results.json | wc -l) finished runs into $OUT_DIR/runs.tgz" \
     "($(du -k "$OUT_DIR/runs.tgz" | cut -f1) KB); the command exited $status"
exit "$status"
