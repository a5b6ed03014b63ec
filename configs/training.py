"""The model and training fields that the trained experiments (`configs/mqar.py`, `configs/recall.py`)
share, and their smoke settings. Not an experiment config itself: no ``get_config``."""
import ml_collections


def add_model_and_training(config: ml_collections.ConfigDict, *, num_steps: int, batch_size: int,
                           warmup_steps: int) -> ml_collections.ConfigDict:
    """Add the fields of the model (`experiments.models.LanguageModel`) and of its training
    (`experiments.training.TrainSettings`) to ``config``; return it."""
    # model
    config.num_layers = 2
    config.head_dim = 64              # heads = max(1, d_model // head_dim)
    config.conv_size = 4
    config.mlp_ratio = 0              # Zoology's figure 2 has no MLP
    config.backend = "auto"           # a filters.compile backend for the design layers
    # training
    config.num_steps = num_steps
    config.batch_size = batch_size
    config.warmup_steps = warmup_steps
    # any optax alias with its keyword arguments, e.g. "lion(b1=0.95, b2=0.98)", "sgd(momentum=0.9)",
    # "contrib.muon" (the learning rate is the sweep's, the weight decay the field below)
    config.optimizer = "adamw(b1=0.9, b2=0.98, eps=1e-8)"
    # after the warm-up: "cosine" or "linear" (to final_lr_fraction), "constant", or any optax schedule in
    # units of the peak learning rate, e.g. "exponential_decay(init_value=1.0, transition_steps=500, decay_rate=0.5)"
    config.schedule = "cosine"
    config.weight_decay = 0.1         # decoupled, on matrices only, whatever the optimizer
    config.grad_clip = 1.0
    config.final_lr_fraction = 0.0
    config.seed = 0
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint_every = 500
    config.keep_checkpoints = 2       # the newest ones kept: an unreadable checkpoint falls back to the one before
    config.eval_batch_size = 256
    config.throughput_steps = 10
    config.progress = True
    # after training, collect every finished run of the workdir into results.csv, table.md and the figures
    # (experiments/concurrent_sweep.sh turns it off in its one-run processes and reports once at the end)
    config.report = True
    # check every run folder of the grid against this config (one holding a run of other settings is an error)
    # and exit without training (experiments/concurrent_sweep.sh, before it queues the unfinished runs)
    config.check_only = False
    config.kill_at_step = 0           # debugging: SIGKILL the process after this step of each run (0: never)
    return config


# What a smoke run changes of the fields above (seconds on a CPU).
SMOKE = {
    "head_dim": 8, "backend": "sequential", "num_steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2,
    "checkpoint_every": 2, "eval_batch_size": 16, "throughput_steps": 1, "progress": False,
}
