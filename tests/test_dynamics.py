"""The dynamics experiments (docs/dynamics.md): the smoke configs of `experiments.collision` and
`experiments.crowding` run end to end, write their records and figures, and every closed form agrees
with the compiled filters' measurement within 1%. The closed forms are also checked against the scalar
recursions they solve, iterated directly."""
import json
import math
import os

import numpy as np
import pytest

from configs import collision as collision_config
from configs import crowding as crowding_config
from experiments import collision, crowding, dynamics

REQUIRED = {"quantity": str, "model": str, "measured": float}


def _smoke(module):
    config = module.get_config()
    config.smoke = True
    return config


def _check_records(records, tolerance=0.01):
    assert records, "no records"
    for r in records:
        for key, kind in REQUIRED.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["predicted"] is None or isinstance(r["predicted"], float), r
        assert math.isfinite(r["measured"]), r
        if r["predicted"] is not None:
            assert abs(r["measured"] - r["predicted"]) <= tolerance * abs(r["predicted"]) + 1e-12, r
            assert r["agrees"] is True, r


@pytest.fixture(scope="module")
def collision_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("collision"))
    return collision.run(_smoke(collision_config), workdir), workdir


@pytest.fixture(scope="module")
def crowding_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("crowding"))
    return crowding.run(_smoke(crowding_config), workdir), workdir


def test_collision_records_agree_with_closed_forms(collision_run):
    records, workdir = collision_run
    _check_records(records)
    quantities = {r["quantity"] for r in records}
    assert {"riccati_floor", "plateau", "boost_end", "final_retrieval", "write_gain"} <= quantities
    plateaus = {r["model"] for r in records if r["quantity"] == "plateau"}
    assert plateaus == set(dynamics.MODEL_NAMES)
    assert all(r["predicted"] is not None for r in records)      # every collision quantity has a closed form
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(records))
    for name in ("collision_retrieval.png", "collision_rho_sweep.png", "collision_write_gain.png", "table.md"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name


def test_crowding_records_agree_with_closed_forms(crowding_run):
    records, workdir = crowding_run
    _check_records(records)
    predicted = {r["model"] for r in records if r["predicted"] is not None}
    assert predicted == {"linear_attention", "mamba2", "bayesian"}
    assert {r["model"] for r in records} == set(dynamics.MODEL_NAMES)
    assert os.path.getsize(os.path.join(workdir, "crowding.png")) > 0
    with open(os.path.join(workdir, "results.json")) as f:
        assert len(json.load(f)) == len(records)


@pytest.mark.parametrize("beta,q,p0", [(1.0, 0.0, 1.0), (1.0, 0.01, 1.0), (4.0, 0.1, 0.3), (0.5, 0.02, 0.0)])
def test_scalar_riccati_closed_form_solves_the_recursion(beta, q, p0):
    steps = 300
    p, inv_den = dynamics.scalar_riccati(p0, beta, q, steps)
    direct, prod = [p0], [1.0]
    for _ in range(steps):
        p_bar = direct[-1] + q
        direct.append(p_bar / (1 + beta * p_bar))
        prod.append(prod[-1] * (1 - beta * direct[-1]))          # 1 - g_t
    np.testing.assert_allclose(p, direct, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(inv_den, prod, rtol=1e-12, atol=1e-15)
    if q > 0:   # the floor is the fixed point: beta p^2 + beta q p - q = 0
        p_plus = dynamics.riccati_floor(beta, q) / beta
        assert abs(beta * p_plus ** 2 + beta * q * p_plus - q) < 1e-14
        assert abs(direct[-1] - p_plus) < 1e-10


def test_crowding_closed_forms_limits():
    # Mamba-2 with dt = 1 and no decay is linear attention; small n/D: the single-write residual (1 - g)^2.
    assert math.isclose(dynamics.crowding_prediction("mamba2", {"alpha": 1 - 1e-12, "dt": 1.0}, 50, 100),
                        49 / 100, rel_tol=1e-6)
    lam = 0.25
    assert math.isclose(dynamics.marchenko_pastur_ridge_loss(1e-9, lam), (lam / (1 + lam)) ** 2, rel_tol=1e-6)
    assert math.isclose(dynamics.marchenko_pastur_ridge_loss(8.0, 1e-9), 1 - 1 / 8, rel_tol=1e-6)


def test_reset_family_predictive_variance_is_that_of_the_reset_covariance():
    """A reset step is an exact update from ``P_bar = sigma^2 I``: the predictive variance it reports is
    ``q^T P q`` with ``P = sigma^2 I - u u^T / (k^T u + 1 / beta)``, ``u = sigma^2 k``, computed here
    directly (Longhorn: sigma^2 = 1, beta a precision)."""
    import designmodels as dm
    import filters
    from tests.support import random_inputs

    model = dm.longhorn()
    q, k, v, gates = random_inputs(model, batch=1, time=3, heads=2, key_dim=4, value_dim=2, seed=5, unit_keys=False)
    _, _, diagnostics = filters.compile(model, backend="sequential")(q, k, v, diagnostics=True, **gates)
    beta = gates["beta"]
    u = k                                                        # sigma^2 = 1
    s = np.sum(k * u, -1) + 1 / beta
    want = np.sum(q * q, -1) - np.sum(q * u, -1) ** 2 / s
    np.testing.assert_allclose(np.asarray(diagnostics.predictive_variance), want, rtol=1e-10)
