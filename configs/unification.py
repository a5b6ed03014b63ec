"""The unification table (DESIGN.md section 2, docs/unification.md): every named design model, on every
backend, against an independent implementation of its published recurrence, in float64.

    python -m experiments.unification --config=configs/unification.py --workdir=runs/unification
    python -m experiments.unification --config=configs/unification.py --config.smoke=True --workdir=/tmp/u
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.models = ("linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "longhorn",
                     "bayesian")
    config.backends = ("sequential", "associative", "chunked")
    # (batch, time, heads, key_dim, value_dim): T = 1, odd lengths, several heads, K != V.
    config.shapes = ((1, 1, 1, 4, 4), (2, 17, 3, 8, 6), (2, 64, 2, 16, 16), (1, 129, 4, 8, 12))
    # The Bayesian Layer has no published recurrence: its oracle is the dense joint Gaussian, O(T^3 K^3),
    # so it is checked on the shapes with T * K at most this.
    config.joint_gaussian_max_size = 160
    config.seeds = (0, 1)
    config.tolerance = 1e-10          # "exact to round-off" in float64
    config.smoke = False
    # smoke: one shape (T = 1 and the others are tests/test_unification.py's, measured one by one)
    config.smoke_settings = ml_collections.ConfigDict({"shapes": ((2, 9, 2, 4, 3),), "seeds": (0,)})
    return config
