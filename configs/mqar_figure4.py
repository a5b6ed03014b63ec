"""The paper's MQAR figure, "MQAR with shared key-value vocabulary" (Dowling, Jeon, Savin & Park, "Memory by
Design: Probabilistic Sequence Layers", the three-panel MQAR figure), as the paper ran it: every panel
with the shared vocabulary (keys and values drawn from one pool; a token's role is given only by its
position), (a) base MQAR, (b) Update-MQAR, (c) Block-MQAR (layouts in docs/experiments.md), the models
of the figure with and without their short convolution, and the learning rates and seeds of the sweep
protocol (issue #15: Zoology's logspace(-4, -2, 4), three seeds).

    python -m experiments.mqar_figure4 --config=configs/mqar_figure4.py --workdir=runs/mqar_figure4
    python -m experiments.mqar_figure4 --config=configs/mqar_figure4.py --config.smoke=True --workdir=/tmp/figure4

Every field of configs/mqar.py applies (the runs are `experiments.mqar`'s, one set per seed); ``seeds``
replaces ``seed``. The report (figure4.png, figure4.md, figure4.csv in the workdir) takes, per panel,
model and d_model, the learning rate with the best mean accuracy over the seeds at the training shape,
and draws that mean with error bars from the lowest to the highest seed.
"""
import ml_collections

from configs import mqar


def get_config():
    config = mqar.get_config()
    config.variants = ("base", "update", "block")           # the panels (a), (b), (c)
    config.vocabulary = "shared"                            # the figure's title: one pool for keys and values
    # the models of the figure: the Bayesian Layer and Gated DeltaNet with and without their convolution
    config.models = ("bayesian", "bayesian_no_conv", "gated_deltanet", "gated_deltanet_no_conv", "mamba2",
                     "deltanet", "linear_attention", "attention")
    config.d_models = (64, 128, 256, 512)
    config.learning_rates = (1e-4, 4.6e-4, 2.2e-3, 1e-2)      # np.logspace(-4, -2, 4), as Zoology
    # (256, 16): the hardest Zoology shape that Block-MQAR's layout fits ((512, 64) needs L >= 640 with gap 6)
    config.train_shapes = ((256, 16),)
    config.eval_multipliers = ((1, 1), (2, 2))
    config.seeds = (0, 1, 2)                                # training seeds: initialisation and data order
    config.smoke_settings = ml_collections.ConfigDict({
        **config.smoke_settings.to_dict(), "variants": ("base", "update", "block"),
        "models": ("attention", "bayesian_no_conv"), "d_models": (16,), "seeds": (0, 1),
    })
    return config
