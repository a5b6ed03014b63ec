"""Key crowding (DESIGN.md section 5, docs/dynamics.md section 3): figure `docs/figures/crowding.png`, the
loss at the queries as `n / D` grows for every model, beside the closed-form cross-direction predictions
(linear attention and Mamba-2 exactly; the Bayesian Layer without process noise, Marchenko-Pastur).

    python -m experiments.crowding --config=configs/crowding.py --workdir=runs/crowding
    python -m experiments.crowding --config=configs/crowding.py --config.smoke=True --workdir=/tmp/crowding
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.models = ("linear_attention", "deltanet", "gated_deltanet", "mamba2", "bayesian", "bayesian_noise")
    config.key_dim = 256               # D; the Marchenko-Pastur prediction is asymptotic in D (bias ~ 1/D)
    config.ratios = (0.25, 0.5, 1.0, 2.0, 4.0)   # n / D
    # Trials per n: enough independent key pairs that the Monte-Carlo error of the mean loss is ~0.2%:
    # trials = max(min_trials, ceil(pairs / (n (n - 1) / 2))).
    config.pairs = 500_000
    config.min_trials = 4
    config.seed = 0
    # Gates (constant over the writes; decays are switched off while querying).
    config.deltanet_beta = 0.9
    config.gdn_alpha = 0.995
    config.gdn_beta = 0.9
    config.mamba2_dt = 1.0             # input_scale = dt, log_decay = dt * A
    config.mamba2_A = -0.005
    config.bayes_prior_variance = 1.0  # l^2
    config.bayes_beta = 4.0            # precision: ridge lambda = 1 / (beta l^2) = 0.25
    config.bayes_process_noise = 0.001
    config.tolerance = 0.01
    config.smoke = False
    config.smoke_settings = ml_collections.ConfigDict({"ratios": (2.0,), "pairs": 200_000})
    return config
