"""Process noise along the key (`dm.KeyNoise`, ``Q_t = q_t k_t k_t^T``): the exact filter against its
Kalman recursion written out in float64, the overwrite it is for, and the lowerings that run it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
import layers

B, T, H, K, V = 2, 7, 2, 3, 2


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, H, d)) for d in (K, K, V))
    gates = dict(log_decay=-rng.uniform(0.0, 0.5, (B, T, H)), process_noise=rng.uniform(0.0, 3.0, (B, T, H)),
                 beta=rng.uniform(0.5, 4.0, (B, T, H)))
    return q, k, v, gates


def _oracle(q, k, v, gates, prior_variance=1.0):
    """The Kalman recursion, written out: ``P_bar = a^2 P + q k k^T``, ``u = P_bar k``,
    ``s = k^T u + 1 / beta``, ``Kg = u / s``, ``S = a S + Kg (v - a S^T k)^T``, ``P = P_bar - u Kg^T``,
    ``y = S^T q``. Returns ``y``, the final ``S`` and ``P``, and the gains ``k^T Kg``."""
    y, gain = np.zeros(v.shape), np.zeros(v.shape[:3])
    means, covs = np.zeros((B, H, K, V)), np.zeros((B, H, K, K))
    for b in range(B):
        for h in range(H):
            s_mean, p = np.zeros((K, V)), prior_variance * np.eye(K)
            for t in range(T):
                a = np.exp(gates["log_decay"][b, t, h])
                kt = k[b, t, h]
                p_bar = a * a * p + gates["process_noise"][b, t, h] * np.outer(kt, kt)
                s_mean = a * s_mean
                u = p_bar @ kt
                kg = u / (kt @ u + 1.0 / gates["beta"][b, t, h])
                s_mean = s_mean + np.outer(kg, v[b, t, h] - s_mean.T @ kt)
                p = p_bar - np.outer(u, kg)
                y[b, t, h] = s_mean.T @ q[b, t, h]
                gain[b, t, h] = kt @ kg
            means[b, h], covs[b, h] = s_mean, p
    return y, means, covs, gain


@pytest.mark.parametrize("backend", ["sequential", "associative", "chunked"])
def test_key_noise_filter_is_its_kalman_recursion(backend):
    """Every lowering that runs key noise against the written-out recursion (chunked: chunks of 3 over
    T = 7, the last padded: its block formulas, filters/chunked.py)."""
    q, k, v, gates = _inputs()
    options = {"chunk_size": 3} if backend == "chunked" else {}
    f = filters.compile(dm.bayesian(process_noise="key"), backend=backend, **options)
    y, state = f(q, k, v, **gates)
    y_ref, mean_ref, cov_ref, gain_ref = _oracle(q, k, v, gates)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state.mean, mean_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state.covariance, cov_ref, rtol=1e-9, atol=1e-9)
    if backend in ("sequential", "chunked"):
        _, _, diagnostics = f(q, k, v, diagnostics=True, **gates)
        np.testing.assert_allclose(diagnostics.write_gain, gain_ref, rtol=1e-9, atol=1e-12)
    if backend == "chunked":    # the predictive variance and the likelihood, as the sequential filter's
        _, _, want = filters.compile(dm.bayesian(process_noise="key"), backend="sequential")(
            q, k, v, diagnostics=True, **gates)
        for field in ("predictive_variance", "log_predictive_density"):
            np.testing.assert_allclose(getattr(diagnostics, field), getattr(want, field), rtol=1e-9, atol=1e-12)


def test_a_fixed_key_noise_is_the_run_time_one_held_constant():
    q, k, v, gates = _inputs(1)
    fixed = dm.DesignModel(noise=dm.KeyNoise(0.7), observation=dm.KeyValueObservation(2.0))
    y, state = filters.compile(fixed, backend="sequential")(q, k, v)
    gates = dict(log_decay=np.zeros((B, T, H)), process_noise=np.full((B, T, H), 0.7), beta=np.full((B, T, H), 2.0))
    y_ref, _, cov_ref, _ = _oracle(q, k, v, gates)
    np.testing.assert_allclose(y, y_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(state.covariance, cov_ref, rtol=1e-9, atol=1e-9)
    assert dm.DesignModel(noise=dm.KeyNoise(0.0)).structure.noise == "none"


def _one_key_repeated(model, n=32, beta=8.0, q=100.0):
    """``n`` writes along the unit key ``e_1`` (no decay); the gains and the final covariance."""
    k = np.zeros((1, n, 1, 4))
    k[..., 0] = 1.0
    v = np.random.default_rng(0).normal(size=(1, n, 1, 2))
    gates = dict(beta=np.full((1, n, 1), beta))
    if "process_noise" in model.runtime_inputs:
        gates["process_noise"] = np.full((1, n, 1), q)
    _, state, diagnostics = filters.compile(model, backend="sequential", diagnostics=True)(k, k, v, **gates)
    return np.asarray(diagnostics.write_gain[0, :, 0]), np.asarray(state.covariance[0, 0])


def test_key_noise_keeps_overwriting_one_key_and_stays_sure_of_the_others():
    """Along a unit key written ``n`` times the gain of the noiseless filter is ``beta / (1 + n beta)``
    (ridge regression); with ``q k k^T`` it stays above ``q / (q + 1 / beta)`` at every write, and the
    covariance of the directions orthogonal to the key stays the prior's (a random walk ``q I`` would
    inflate it to ``1 + n q``)."""
    gain, cov = _one_key_repeated(dm.bayesian(process_noise="key", decay="none"))
    assert np.all(gain > 0.99), gain
    np.testing.assert_allclose(cov[1:, 1:], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(cov[0, 1:], 0.0, atol=1e-12)
    plain, _ = _one_key_repeated(dm.bayesian(decay="none"))
    n = np.arange(1, 33)
    np.testing.assert_allclose(plain, 8.0 / (1 + n * 8.0), rtol=1e-9)
    assert plain[-1] < 0.05
    _, walk_cov = _one_key_repeated(dm.bayesian(process_noise="input", decay="none"))
    np.testing.assert_allclose(np.diag(walk_cov)[1:], 1 + 32 * 100.0, rtol=1e-9)


def test_key_noise_gradients_are_finite_and_the_same_chunked():
    """Also where ``q_t = 0`` (the chunked form has no square root of ``q``, whose derivative there is
    infinite)."""
    q, k, v, gates = _inputs(2)
    gates["process_noise"][:, ::3] = 0.0
    grads = {}
    for backend in ("sequential", "chunked"):
        f = filters.compile(dm.bayesian(process_noise="key"), backend=backend)

        def loss(k, noise, beta):
            return jnp.sum(f(q, k, v, **{**gates, "process_noise": noise, "beta": beta})[0] ** 2)

        grads[backend] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
            jnp.asarray(k), jnp.asarray(gates["process_noise"]), jnp.asarray(gates["beta"]))
    for g, want in zip(grads["chunked"], grads["sequential"]):
        assert np.all(np.isfinite(g)) and np.any(g != 0)
        np.testing.assert_allclose(g, want, rtol=1e-8, atol=1e-10)


def test_pallas_runs_key_noise_and_auto_takes_it_on_a_gpu():
    """The Pallas covariance kernels take key noise (tests/test_pallas.py checks them against the
    recursion); auto picks them on a GPU and the chunked form on this CPU, as for isotropic noise."""
    model = dm.bayesian(process_noise="key")
    assert filters.compile(model).lowering.name == "chunked"
    if filters.pallas.common.pltriton is not None:                # else refused for want of Triton
        assert filters.LOWERINGS["pallas"].reason_not_applicable(model.structure) is None
        assert filters.lowering.auto(model.structure, platform="gpu").name == "pallas"


def test_bayesian_process_noise_key_option():
    assert dm.bayesian(process_noise="key").noise == dm.KeyNoise(None)
    assert "process_noise" in dm.bayesian(process_noise="key").runtime_inputs
    assert dm.bayesian(noise="key", process_noise="input") == dm.bayesian(process_noise="key")
    assert dm.bayesian(noise="key", process_noise=5.0).noise == dm.KeyNoise(5.0)
    assert dm.bayesian(noise="key").noise == dm.NoProcessNoise()
    with pytest.raises(dm.DesignModelError, match=r"accepted with noise='key'"):
        dm.bayesian(noise="key", process_noise="kye")
    with pytest.raises(dm.DesignModelError, match=r"'random_walk', 'stationary' or 'key'"):
        dm.bayesian(noise="keys")
    with pytest.raises(dm.DesignModelError, match=r"did you mean 'key'.*'key' \(q_t k_t k_t\^T"):
        dm.bayesian(process_noise="kye")
    with pytest.raises(dm.DesignModelError, match=r"process_noise='key', noise='stationary'.*accepted"):
        dm.bayesian(process_noise="key", noise="stationary")
    with pytest.raises(dm.DesignModelError, match=r"KeyNoise.variance.*>= 0"):
        dm.KeyNoise(-1.0)
    with pytest.raises(dm.DesignModelError, match=r"Reset overwrites the predicted covariance"):
        dm.DesignModel(noise=dm.KeyNoise(), observation=dm.KeyValueObservation(None), covariance=dm.Reset())


def test_a_layer_with_key_noise_gets_a_process_noise_gate():
    """The layer projects a process-noise gate, and the output's gradient reaches it (sequential lowering:
    the chunked form's gradients are tested above, and its CPU compile of the layer takes 40 s more)."""
    layer = layers.DesignLayer(dm.bayesian(process_noise="key"), d_model=12, num_heads=2, key_dim=4,
                               value_dim=3, backend="sequential", conv_size=0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 12))
    params = jax.jit(layer.init)(jax.random.PRNGKey(1), x)            # jitted: op by op takes minutes
    y = jax.jit(layer.apply)(params, x)
    assert y.shape == (2, 5, 12) and np.all(np.isfinite(y))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    assert np.any(grads["params"]["gates"]["noise_proj"]["kernel"] != 0)
