"""Learned associative recall (DESIGN.md section 5): a 2-layer model per sequence layer, trained to recall
the value token bound to a random key vector, then evaluated beyond its training regime: more pairs
than it was trained on (up to and past the key dimension), a longer wait between writing and recall,
and colliding keys (pairs of keys with a fixed overlap rho). Reproduces the table and figure of
docs/experiments.md, "Learned associative recall", with the learning-rate rule of `configs/mqar.py`: four
rates (logspace(-4, -2, 4)), three seeds, the rate chosen on a validation split of the training regime (early
stop at 0.99 there), the conditions reported as the test split, mean ± spread over seeds. Budget: 2,000
steps of 128 sequences, warm-up 200, the same for every model. Design layers on ``backend = "auto"`` (the Pallas
kernels on a GPU, the chunked form on a CPU; what that means and what is tested: `configs/mqar.py`).

    python -m experiments.recall --config=configs/recall.py --workdir=runs/recall
    python -m experiments.recall --config=configs/recall.py --config.smoke=True --workdir=/tmp/recall

Writes runs/<model>/d<d_model>_lr<lr>_seed<seed>/ (checkpoints, metrics.csv, eval.csv, results.json) and, over every
finished run of the workdir, results.csv, table.md and accuracy_by_condition.png.
"""
import ml_collections

from configs import training


def get_config():
    config = ml_collections.ConfigDict()
    config.models = ("attention", "linear_attention", "mamba2", "deltanet", "gated_deltanet", "bayesian",
                     "bayesian_no_conv")
    config.d_models = (64,)
    config.learning_rates = (1e-4, 4.6e-4, 2.2e-3, 1e-2)      # np.logspace(-4, -2, 4), as MQAR
    # data (experiments.tasks.recall): keys are unit vectors in key_dim dimensions, values are tokens.
    config.key_dim = 16
    config.num_values = 64
    config.train_pairs = 8
    config.train_seq_len = 64
    config.train_collision_fraction = 0.0
    config.train_collision_overlap = 0.0
    # (name, num_kv_pairs, seq_len, collision_fraction, collision_overlap)
    config.eval_conditions = (
        ("train", 8, 64, 0.0, 0.0),
        ("pairs_12", 12, 64, 0.0, 0.0),
        ("pairs_16", 16, 64, 0.0, 0.0),
        ("pairs_24", 24, 96, 0.0, 0.0),
        ("wait_256", 8, 256, 0.0, 0.0),
        ("wait_1024", 8, 1024, 0.0, 0.0),
        ("collide_0.5", 8, 64, 1.0, 0.5),
        ("collide_0.9", 8, 64, 1.0, 0.9),
        ("collide_0.99", 8, 64, 1.0, 0.99),
    )
    config.num_train_examples = 50_000
    config.num_valid_examples = 1_000   # the validation split (the training regime): early stop, learning rate
    config.num_eval_examples = 1_000    # each condition
    config.data_seed = 0
    training.add_model_and_training(config, num_steps=2000, batch_size=128, warmup_steps=200)
    config.backend = "auto"           # pallas on a GPU, chunked on a CPU; runs record which (models.lowering_of)
    config.smoke = False
    config.smoke_settings = ml_collections.ConfigDict({
        "models": ("attention", "bayesian"), "d_models": (16,), "learning_rates": (3e-3,), "key_dim": 8,
        "num_values": 8, "train_pairs": 2, "train_seq_len": 16,
        "eval_conditions": (("train", 2, 16, 0.0, 0.0), ("pairs_4", 4, 16, 0.0, 0.0),
                            ("collide_0.9", 2, 16, 1.0, 0.9)),
        "num_train_examples": 32, "num_valid_examples": 16, "num_eval_examples": 16, **training.SMOKE,
    })
    return config
