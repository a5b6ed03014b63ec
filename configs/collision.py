"""The collision study (DESIGN.md section 5, docs/dynamics.md section 2): figures
`docs/figures/collision_retrieval.png` (retrieval over time at `rho`), `collision_rho_sweep.png` (final
retrieval against `rho`) and `collision_write_gain.png` (the write gain against its envelope and Riccati
floor), and the closed-form plateau of every model beside the measured one.

    python -m experiments.collision --config=configs/collision.py --workdir=runs/collision
    python -m experiments.collision --config=configs/collision.py --config.smoke=True --workdir=/tmp/collision
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.models = ("linear_attention", "deltanet", "gated_deltanet", "mamba2", "bayesian", "bayesian_noise")
    config.key_dim = 8                 # the two keys span a random plane of R^K; the closed forms do not depend on K
    config.n_boost = 20                # writes k_B -> v_B
    config.n_flood = 200               # then writes k_A -> v_A
    config.rho = 0.6                   # k_A . k_B for the trace figure
    config.rho_sweep = tuple(round(0.05 * i, 2) for i in range(20)) + (0.97, 0.99)
    config.temperature = 0.25          # retrieval = softmax([y_B, y_A] / temperature)[0]
    config.seed = 0
    # Gates (constant over time).
    config.deltanet_beta = 0.5
    config.gdn_alpha = 0.98
    config.gdn_beta = 0.5
    config.mamba2_dt = 0.1             # input_scale = dt, log_decay = dt * A
    config.mamba2_A = -0.5
    config.bayes_prior_variance = 1.0  # l^2
    config.bayes_beta = 1.0            # observation precision
    config.bayes_process_noise = 0.01  # q of "bayesian_noise"
    # The write-gain study: repeated writes to one unit key, for each (beta, q).
    config.gain_settings = ((1.0, 0.0), (1.0, 0.001), (1.0, 0.01), (4.0, 0.01), (1.0, 0.1))
    config.gain_steps = 400
    config.tolerance = 0.01            # relative agreement required of every closed form
    config.smoke = False
    config.smoke_settings = ml_collections.ConfigDict({
        "key_dim": 4, "n_boost": 5, "n_flood": 40, "rho_sweep": (0.0, 0.5, 0.9),
        "gain_settings": ((1.0, 0.0), (1.0, 0.1)), "gain_steps": 120})
    return config
