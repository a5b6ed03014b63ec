"""Training and evaluation shared by the recall experiments, one job per module:

* `experiments.training.step`, the compiled step: `TrainSettings`, the optimizer (any optax alias by name, or a
  GradientTransformation; warm-up and a schedule; the peak learning rate injected as a hyperparameter), the loss
  at the supervised positions, the data-parallel mesh, `make_train_step`, `make_eval_step`, `evaluate`,
  `measure_throughput`; for a block of runs `block_mesh`, `make_block_train_step`, `make_block_eval_step`,
  `evaluate_block`;
* `experiments.training.loop`, the loop: `train` a model in a run folder (resuming, stopping a diverged run,
  stopping early at an accuracy), `train_block` several runs that differ only in learning rate and seed as one
  vectorized program (each in its own folder), the data order (`BatchSchedule`);
* `experiments.training.records`, the run folder: `run_identity` (``run.json``), `check_run_folder`,
  `restore_checkpoint` with its fallback, `load_checkpoint`;
* `experiments.training.logs`, the logs: ``metrics.csv`` and ``eval.csv`` (`CsvLog`), TensorBoard, progress.

Their public names are this package's: ``from experiments import training; training.train(...)``.
"""
from experiments.training.logs import EVAL_FIELDS, TRAIN_FIELDS, CsvLog, Progress, RunLogs, read_csv
from experiments.training.loop import BatchSchedule, RunSpec, Stopped, train, train_block
from experiments.training.records import (
    ADDED_SETTINGS, UNRECORDED_SETTINGS, check_run_folder, identity_differences, is_diverged, load_checkpoint,
    restore_checkpoint, run_identity,
)
from experiments.training.step import (
    Batch, OptimizerError, TrainSettings, TrainState, block_key, block_mesh, current_learning_rate, data_mesh,
    evaluate, evaluate_block, init_state, logits_and_labels, loss_and_metrics, make_block_eval_step,
    make_block_train_step, make_eval_step, make_train_step, measure_throughput, optimizer, put_batch,
    put_block_batch, schedule, scheduled_learning_rate, stack_states, supervised_count, unstack_states,
)

__all__ = [
    "ADDED_SETTINGS", "Batch", "BatchSchedule", "CsvLog", "EVAL_FIELDS", "OptimizerError", "Progress", "RunLogs",
    "RunSpec", "Stopped", "TRAIN_FIELDS", "TrainSettings", "TrainState", "UNRECORDED_SETTINGS", "block_key",
    "block_mesh", "check_run_folder", "current_learning_rate", "data_mesh", "evaluate", "evaluate_block",
    "identity_differences", "init_state", "is_diverged", "load_checkpoint", "logits_and_labels",
    "loss_and_metrics", "make_block_eval_step", "make_block_train_step", "make_eval_step", "make_train_step",
    "measure_throughput", "optimizer", "put_batch", "put_block_batch", "read_csv", "restore_checkpoint",
    "run_identity", "schedule", "scheduled_learning_rate", "stack_states", "supervised_count", "train",
    "train_block", "unstack_states",
]
