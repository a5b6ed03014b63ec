"""The likelihood in the diagnostics, ``log p(v_t | v_<t)``: the exact family against the dense joint
Gaussian and against dynamax's Kalman filter (``lgssm_filter``'s marginal log-likelihood), the reset
family against a Kalman update restarted from ``N(A S, sigma^2 I)`` at every step, every lowering that
reports it against the float64 sequential oracle, and nothing computed without diagnostics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
from experiments.oracles import joint_gaussian
from filters.checks import prepare
from tests.support import (ALL_MODELS, USER_EXACT_MODELS, applies, compile_for_tests, random_inputs,
                           random_state, relative_error)

RESET_MODELS = sorted(n for n, m in ALL_MODELS.items() if m.family == "reset")


def _with_diagnostics(model):
    """The registered lowerings that apply to ``model`` and report diagnostics for it."""
    structure = filters.analyze(model)
    return [name for name, lowering in filters.LOWERINGS.items()
            if not lowering.reason_not_applicable(structure) and lowering.supports_diagnostics(structure)]


def _log_density(model, backend, q, k, v, gates, state=None):
    *_, diagnostics = compile_for_tests(model, backend, diagnostics=True)(q, k, v, initial_state=state, **gates)
    return diagnostics.log_predictive_density


@pytest.mark.parametrize("name", sorted(USER_EXACT_MODELS))
def test_exact_family_equals_the_dense_joint_gaussian(name):
    """Per step, on every lowering that reports it, from a random initial state (chunks of 4 over 9
    steps: chunk boundaries and padding)."""
    model = USER_EXACT_MODELS[name]
    q, k, v, gates = random_inputs(model, batch=2, time=9, heads=2, key_dim=4, value_dim=3, seed=3,
                                   unit_keys=False)
    state = random_state(model, 2, 2, 4, 3, seed=8)
    reference = joint_gaussian.log_predictive_densities(model, q, k, v, gates, *state)
    backends = _with_diagnostics(model)
    assert "sequential" in backends and (applies(model, "chunked") == ("chunked" in backends))
    for backend in backends:
        density = _log_density(model, backend, q, k, v, gates, state)
        assert density.shape == (2, 9, 2)
        assert relative_error(density, reference) < 1e-10, backend


@jax.jit
def _dynamax_marginal_log_likelihood(a, noise, keys, precision, initial_mean, initial_covariance, values):
    """dynamax's ``lgssm_filter(...).marginal_loglik`` of one sequence and head, summed over the value
    columns (each column is its own LGSSM with scalar emissions ``v_t[r] = k_t^T s_t + e``): ``a, noise
    [T, K, K]`` are ``A_t, Q_t``, ``keys [T, K]``, ``precision [T]``, ``initial_mean S_0 [K, V]``,
    ``initial_covariance P_0 [K, K]``, ``values [T, V]``.

    dynamax observes its first state before any transition, and its transition into step ``t`` is entry
    ``t`` of the time-varying weights (entry 0 unused): so its initial state is ours after one predict,
    ``N(A_0 S_0, A_0 P_0 A_0^T + Q_0)``, and its weights are our ``A_t, Q_t``."""
    from dynamax.linear_gaussian_ssm import (ParamsLGSSM, ParamsLGSSMDynamics, ParamsLGSSMEmissions,
                                             ParamsLGSSMInitial, lgssm_filter)
    key_dim = keys.shape[-1]

    def column(mean, observed):
        params = ParamsLGSSM(
            initial=ParamsLGSSMInitial(mean=a[0] @ mean, cov=a[0] @ initial_covariance @ a[0].T + noise[0]),
            dynamics=ParamsLGSSMDynamics(weights=a, bias=jnp.zeros(key_dim), input_weights=jnp.zeros((key_dim, 0)),
                                         cov=noise),
            emissions=ParamsLGSSMEmissions(weights=keys[:, None, :], bias=jnp.zeros(1),
                                           input_weights=jnp.zeros((1, 0)), cov=(1.0 / precision)[:, None, None]))
        return lgssm_filter(params, observed[:, None]).marginal_loglik

    return jnp.sum(jax.vmap(column, in_axes=(1, 1))(initial_mean, values))


@pytest.mark.parametrize("name", ["bayesian_random_walk", "bayesian_stationary", "dense_transition_input_noise",
                                  "fixed_channel_decay_stationary"])
def test_marginal_log_likelihood_equals_dynamax(name):
    """The running sum of ``log p(v_t | v_<t)`` is dynamax's marginal log-likelihood of every prefix
    ``v_1..t``, in float64, on every lowering that reports it."""
    try:   # in the test extra (pyproject.toml), so CI runs this; skipped only where it is not installed
        import dynamax  # noqa: F401
    except ModuleNotFoundError as error:
        pytest.skip(f"dynamax is not installed here ({error}); pip install -e '.[test]'")
    model = USER_EXACT_MODELS[name]
    batch, time, heads, key_dim, value_dim = 2, 6, 2, 4, 3
    q, k, v, gates = random_inputs(model, batch=batch, time=time, heads=heads, key_dim=key_dim,
                                   value_dim=value_dim, seed=5)
    state = random_state(model, batch, heads, key_dim, value_dim, seed=2)
    reference = np.zeros((batch, time, heads))
    for b in range(batch):
        for h in range(heads):
            a, noise = (np.stack(m) for m in joint_gaussian.dynamics(model, gates, b, h, time, key_dim))
            precision = joint_gaussian.observation_precisions(model, gates, b, h, time)
            for n in range(1, time + 1):
                reference[b, n - 1, h] = _dynamax_marginal_log_likelihood(
                    a[:n], noise[:n], k[b, :n, h], precision[:n], state.mean[b, h], state.covariance[b, h],
                    v[b, :n, h])
    for backend in _with_diagnostics(model):
        running = np.cumsum(_log_density(model, backend, q, k, v, gates, state), axis=1)
        # dynamax adds 1e-9 to every innovation variance before solving (dynamax.utils.psd_solve)
        assert relative_error(running, reference) < 1e-8, backend


@pytest.mark.parametrize("name", RESET_MODELS)
def test_reset_family_is_a_kalman_update_restarted_at_every_step(name):
    """docs/unification.md's reading of a reset: before every update the covariance is ``sigma_t^2 I``;
    so ``v_t[r] | v_<t ~ N(k_t^T s_bar_r, sigma_t^2 |k_t|^2 + 1/beta_t)``, with the observation precision
    one under the write-strength parameterization (``sigma^2 = eta / (1 - eta |k|^2)``). Written here as
    a Kalman update from the declaration (not as the delta rule), on a random initial state."""
    model = ALL_MODELS[name]
    batch, time, heads, key_dim, value_dim = 2, 7, 2, 4, 3
    q, k, v, gates = random_inputs(model, batch=batch, time=time, heads=heads, key_dim=key_dim,
                                   value_dim=value_dim, seed=6)
    state = random_state(model, batch, heads, key_dim, value_dim, seed=1)
    reset = model.covariance
    reference = np.zeros((batch, time, heads))
    for b in range(batch):
        for h in range(heads):
            a, _ = joint_gaussian.dynamics(model, gates, b, h, time, key_dim)
            given = joint_gaussian.observation_precisions(model, gates, b, h, time)
            mean = np.asarray(state.mean[b, h])                                     # [K, V]
            for t in range(time):
                key = k[b, t, h]
                if reset.write_strength:   # the run-time beta is the step; unit observation precision
                    sigma2, precision = given[t] / (1 - given[t] * key @ key), 1.0
                else:
                    sigma2, precision = reset.variance, given[t]
                predicted = a[t] @ mean                                             # s_bar, columns
                variance = sigma2 * key @ key + 1.0 / precision                     # k^T (sigma^2 I) k + 1/beta
                innovation = v[b, t, h] - predicted.T @ key
                reference[b, t, h] = np.sum(-0.5 * np.log(2 * np.pi * variance) - innovation ** 2 / (2 * variance))
                mean = predicted + np.outer(sigma2 * key / variance, innovation)    # Kalman gain P k / s
    for backend in _with_diagnostics(model):
        assert relative_error(_log_density(model, backend, q, k, v, gates, state), reference) < 1e-10, backend


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_every_lowering_that_reports_it_agrees_with_the_sequential_oracle(name):
    model = ALL_MODELS[name]
    q, k, v, gates = random_inputs(model, batch=2, time=13, heads=2, key_dim=4, value_dim=5, seed=9)
    state = random_state(model, 2, 2, 4, 5, seed=4)
    reference = _log_density(model, "sequential", q, k, v, gates, state)
    if model.family == "additive":       # the values are inputs of the transition, not observations
        assert reference is None
    else:
        assert reference.shape == (2, 13, 2) and np.all(np.isfinite(reference))
    for backend in _with_diagnostics(model):
        density = _log_density(model, backend, q, k, v, gates, state)
        assert (density is None) == (reference is None), backend
        if density is not None:
            assert relative_error(density, reference) < 1e-10, backend


def test_float32_chunked_likelihood_is_close_to_the_float64_oracle():
    model = dm.bayesian(prior_variance=0.5, process_noise=0.05)
    q, k, v, gates = random_inputs(model, batch=2, time=40, heads=2, key_dim=8, value_dim=8, seed=0)
    reference = np.asarray(_log_density(model, "sequential", q, k, v, gates))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    *_, diagnostics = filters.compile(model, backend="chunked", diagnostics=True, chunk_size=16)(
        f32(q), f32(k), f32(v), **{n: f32(g) for n, g in gates.items()})
    assert diagnostics.log_predictive_density.dtype == jnp.float32
    np.testing.assert_allclose(diagnostics.log_predictive_density, reference, rtol=1e-4, atol=1e-4)


def test_gradients_of_the_likelihood_agree_across_lowerings():
    """The likelihood is differentiable (fit a precision or a decay by maximum likelihood): the chunked
    gradient equals the sequential one."""
    model = dm.bayesian(prior_variance=0.5, process_noise=0.05)
    q, k, v, gates = random_inputs(model, batch=1, time=9, heads=2, key_dim=3, value_dim=2, seed=3)

    def total(backend):
        f = compile_for_tests(model, backend, diagnostics=True)
        return lambda v, gates: jnp.sum(f(q, k, v, **gates)[2].log_predictive_density)

    grads = {b: jax.grad(total(b), argnums=(0, 1))(v, gates) for b in ("sequential", "chunked")}
    for a, b in zip(jax.tree_util.tree_leaves(grads["chunked"]), jax.tree_util.tree_leaves(grads["sequential"])):
        assert np.all(np.isfinite(b)) and relative_error(a, b) < 1e-9


@pytest.mark.parametrize("name,backend", [("bayesian", "chunked"), ("bayesian", "sequential"),
                                          ("gated_deltanet", "sequential")])
def test_nothing_is_computed_without_diagnostics(name, backend):
    """The density's logarithm is in the compiled computation with diagnostics and absent without."""
    model = ALL_MODELS[name]
    q, k, v, gates = random_inputs(model, time=8, seed=1)
    f = compile_for_tests(model, backend)
    x = prepare(f.structure, q, k, v, gates)
    state = f.init_state(*q.shape[:1], q.shape[2], q.shape[-1], v.shape[-1], dtype=jnp.float64)

    def compiled(diagnostics):
        return f._run.lower(x, state, backend=backend, diagnostics=diagnostics).compile().as_text()

    assert " log(" in compiled(True)
    assert " log(" not in compiled(False)
