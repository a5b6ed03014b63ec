"""Training and evaluation shared by the recall experiments, one job per module:

* `experiments.training.step`, the compiled step: `TrainSettings`, the optimizer (any optax alias by name, or a
  GradientTransformation; warm-up and a schedule; the peak learning rate injected as a hyperparameter), the loss at the supervised positions, the
  data-parallel mesh, `make_train_step`, `make_eval_step`, `evaluate`, `measure_throughput`;
* `experiments.training.loop`, the loop: `train` a model in a run folder (resuming, stopping a diverged run),
  the data order (`BatchSchedule`);
* `experiments.training.records`, the run folder: `run_identity` (``run.json``), `check_run_folder`,
  `restore_checkpoint` with its fallback, `load_checkpoint`;
* `experiments.training.logs`, the logs: ``metrics.csv`` and ``eval.csv`` (`CsvLog`), TensorBoard, progress.

Their public names are this package's: ``from experiments import training; training.train(...)``.
"""
from experiments.training.logs import EVAL_FIELDS, TRAIN_FIELDS, CsvLog, RunLogs, read_csv
from experiments.training.loop import BatchSchedule, Stopped, train
from experiments.training.records import (
    ADDED_SETTINGS, UNRECORDED_SETTINGS, check_run_folder, identity_differences, is_diverged, load_checkpoint,
    restore_checkpoint, run_identity,
)
from experiments.training.step import (
    Batch, OptimizerError, TrainSettings, TrainState, current_learning_rate, data_mesh, evaluate, init_state,
    logits_and_labels, loss_and_metrics, make_eval_step, make_train_step, measure_throughput, optimizer, put_batch,
    schedule, scheduled_learning_rate, supervised_count,
)

__all__ = [
    "ADDED_SETTINGS", "Batch", "BatchSchedule", "CsvLog", "EVAL_FIELDS", "OptimizerError", "RunLogs", "Stopped",
    "TRAIN_FIELDS", "TrainSettings", "TrainState", "UNRECORDED_SETTINGS", "check_run_folder", "current_learning_rate",
    "data_mesh", "evaluate", "identity_differences", "init_state", "is_diverged", "load_checkpoint",
    "logits_and_labels", "loss_and_metrics", "make_eval_step", "make_train_step", "measure_throughput", "optimizer",
    "put_batch", "read_csv", "restore_checkpoint", "run_identity", "schedule", "scheduled_learning_rate",
    "supervised_count", "train",
]
