"""MQAR (Zoology, Arora et al. 2024) and its variants: a 2-layer model per sequence layer, trained on
multi-query associative recall, swept over d_model, learning rate and sequence length; evaluated at the
training shape and at longer sequences with more pairs. Reproduces the accuracy-vs-d_model figure of
Zoology (its figure 2 recipe: vocabulary 8192, (seq_len, pairs) in (64, 4), (128, 8), (256, 16),
d_model 64-512, learning rates logspace(-4, -2, 4), no MLP) for the four variants of
docs/experiments.md: "base", "shared", "update", "block".

    python -m experiments.mqar --config=configs/mqar.py --workdir=runs/mqar
    python -m experiments.mqar --config=configs/mqar.py --config.smoke=True --workdir=/tmp/mqar
    python -m experiments.mqar --config=configs/mqar.py --workdir=runs/mqar \
        --config.variants='("update",)' --config.models='("gated_deltanet","bayesian")' --config.d_models='(64,)'

Writes runs/<variant>/<model>/L<seq_len>_P<pairs>/d<d_model>_lr<lr>/ (checkpoints, metrics.csv,
eval.csv, results.json) and, over every finished run in the workdir, results.csv, table.md,
accuracy_vs_d_model.png and (for cells trained at several shapes) accuracy_vs_seq_len.png. An
interrupted sweep resumes where it stopped (finished runs are skipped, the interrupted one restarts
from its checkpoint).
"""
import ml_collections

from configs import training


def get_config():
    config = ml_collections.ConfigDict()
    # the sweep
    config.variants = ("base", "shared", "update", "block")
    config.models = ("attention", "linear_attention", "mamba2", "deltanet", "gated_deltanet", "bayesian",
                     "bayesian_no_conv")
    config.d_models = (64, 128, 256, 512)
    config.learning_rates = (1e-4, 4.6e-4, 2.2e-3, 1e-2)      # np.logspace(-4, -2, 4), as Zoology
    config.train_shapes = ((64, 4), (128, 8), (256, 16))      # (seq_len, num_kv_pairs), as Zoology fig. 2
    # Evaluation beyond training: (seq_len multiplier, pairs multiplier) of the training shape; shapes
    # that a variant's layout cannot fit are skipped (and logged).
    config.eval_multipliers = ((1, 1), (2, 1), (2, 2), (4, 4))
    # data (experiments.tasks.mqar)
    config.vocab_size = 8192
    # "split": Zoology's halves (keys [1, V/2), values [V/2, V)) for base, update and block, the shared pool
    # for the variant "shared"; "shared": every variant draws its keys and values from one pool [1, V)
    config.vocabulary = "split"
    config.num_train_examples = 100_000
    config.num_eval_examples = 1_000
    config.power_a = 0.01
    config.random_filler = True
    config.num_updates = 0            # update variant: rebinding pairs; 0 means num_kv_pairs
    config.block_gap = 6              # block variant: separators between a key and its value (> 2 * (4 - 1) - 1)
    config.data_seed = 0
    training.add_model_and_training(config, num_steps=3000, batch_size=256, warmup_steps=300)
    config.smoke = False
    config.smoke_settings = ml_collections.ConfigDict({
        "variants": ("base", "update", "block"), "models": ("attention", "gated_deltanet", "bayesian_no_conv"),
        "d_models": (16,), "learning_rates": (3e-3,), "train_shapes": ((32, 2),),
        "eval_multipliers": ((1, 1), (2, 2)), "vocab_size": 64, "num_train_examples": 64,
        "num_eval_examples": 16, **training.SMOKE,
    })
    return config
