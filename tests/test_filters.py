"""Every lowering against the float64 sequential oracle, and the exact family against the dense joint
Gaussian; user-declared models compile and run with no filter code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import designmodels as dm
import filters
from tests import contract, joint_gaussian
from tests.support import (ALL_MODELS, BACKENDS, NAMED, PARALLEL, USER_EXACT_MODELS, applies as _applies,
                           compile_for_tests as _compile, random_inputs, random_state as _random_state,
                           relative_error)

@pytest.mark.parametrize("name", sorted(USER_EXACT_MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_family_equals_dense_joint_gaussian(name, backend):
    model = USER_EXACT_MODELS[name]
    if not _applies(model, backend):
        pytest.skip(f"{backend} does not apply (tested in test_inapplicable_backends_say_why)")
    q, k, v, gates = random_inputs(model, batch=2, time=5, heads=2, key_dim=4, value_dim=3, seed=7,
                                   unit_keys=False)
    state = _random_state(model, 2, 2, 4, 3, seed=5)
    y, final = _compile(model, backend)(q, k, v, initial_state=state, **gates)
    y_ref, mean_ref, cov_ref = joint_gaussian.filtered_moments(model, q, k, v, gates, *state)
    assert relative_error(y, y_ref) < 1e-10
    assert relative_error(final.mean, mean_ref) < 1e-10
    assert relative_error(final.covariance, cov_ref) < 1e-10


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
@pytest.mark.parametrize("time", [1, 6, 13])
def test_backends_agree_and_step_matches(name, time):
    model = ALL_MODELS[name]
    q, k, v, gates = random_inputs(model, batch=2, time=time, heads=3, key_dim=4, value_dim=5, seed=time)
    state = _random_state(model, 2, 3, 4, 5, seed=time + 1)
    y_ref, final_ref = filters.compile(model, backend="sequential")(q, k, v, initial_state=state, **gates)
    for backend in [b for b in PARALLEL if _applies(model, b)]:
        y, final = _compile(model, backend)(q, k, v, initial_state=state, **gates)
        assert relative_error(y, y_ref) < 1e-10, backend
        for a, b in zip(final, final_ref):
            assert (a is None) == (b is None) and (a is None or relative_error(a, b) < 1e-10), backend

    # auto's pick (chunks of 16 where it is the chunked form: at the default 64 the exact family's program
    # takes seconds to compile, and the chunk size is not what this checks)
    f = filters.compile(model, **({"chunk_size": 16} if filters.Filter(model, "auto").backend == "chunked" else {}))
    contract.assert_step_equals_parallel(*_sequence_model(f), (q, k, v, gates), state=state, split=time // 2)


def _sequence_model(f):
    """A compiled filter as the test contract sees it: ``(parallel, step)`` on ``(q, k, v, gates)``."""
    def parallel(inputs, state):
        q, k, v, gates = inputs
        return f(q, k, v, initial_state=state, **gates)

    def step(state, inputs):
        q, k, v, gates = inputs
        return f.step(state, q, k, v, **gates)

    return parallel, step


@pytest.mark.parametrize("name", ["mamba2", "gla", "gated_deltanet", "longhorn", "bayesian",
                                  "dense_transition_input_noise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_sequence_of_a_batch_is_filtered_alone(name, backend):
    model = ALL_MODELS[name]
    if not _applies(model, backend):
        pytest.skip(f"{backend} does not apply (tested in test_inapplicable_backends_say_why)")
    q, k, v, gates = random_inputs(model, batch=3, time=6, seed=4)
    contract.assert_batch_independent(_sequence_model(_compile(model, backend))[0], (q, k, v, gates))


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "bayesian", "stationary_diagonal_prior"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_final_state_continues_the_sequence(name, backend):
    model = ALL_MODELS[name]
    if not _applies(model, backend):
        pytest.skip(f"{backend} does not apply (tested in test_inapplicable_backends_say_why)")
    q, k, v, gates = random_inputs(model, time=9, seed=3)
    f = _compile(model, backend)
    y_full, final_full = f(q, k, v, **gates)
    cut = lambda a, s: a[:, s]
    y1, state = f(cut(q, slice(0, 4)), cut(k, slice(0, 4)), cut(v, slice(0, 4)),
                  **{n: cut(g, slice(0, 4)) for n, g in gates.items()})
    y2, final = f(cut(q, slice(4, None)), cut(k, slice(4, None)), cut(v, slice(4, None)), initial_state=state,
                  **{n: cut(g, slice(4, None)) for n, g in gates.items()})
    assert relative_error(jnp.concatenate([y1, y2], 1), y_full) < 1e-12
    assert relative_error(final.mean, final_full.mean) < 1e-12


@pytest.mark.parametrize("name", ["mamba2", "gla", "deltanet", "longhorn", "bayesian",
                                  "dense_transition_input_noise"])
def test_gradients_agree_across_backends_and_match_finite_differences(name):
    model = ALL_MODELS[name]
    q, k, v, gates = random_inputs(model, batch=1, time=5, heads=2, key_dim=3, value_dim=2, seed=11)

    def loss(backend):
        f = _compile(model, backend)

        def fn(q, k, v, gates):
            y, state = f(q, k, v, **gates)
            return jnp.sum(jnp.sin(y)) + jnp.sum(state.mean ** 2)
        return fn

    backends = [b for b in BACKENDS if _applies(model, b)]
    grads = {b: jax.grad(loss(b), argnums=(0, 1, 2, 3))(q, k, v, gates) for b in backends}
    contract.assert_gradients_reach(lambda args: loss("sequential")(*args), (q, k, v, gates))
    for backend in backends[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(grads[backend]), jax.tree_util.tree_leaves(grads["sequential"])):
            assert relative_error(a, b) < 1e-9, backend
    # Keys stay fixed for finite differences: a write strength is valid only for the keys it was drawn for.
    check_grads(lambda q, v, gates: loss("sequential")(q, k, v, gates), (q, v, gates), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_diagnostics_match_the_joint_gaussian(backend):
    model = dm.bayesian(prior_variance=0.7, process_noise=0.1)
    q, k, v, gates = random_inputs(model, batch=1, time=6, heads=2, key_dim=3, value_dim=2, seed=2)
    y, state, diag = _compile(model, backend, diagnostics=True)(q, k, v, **gates)
    assert diag.write_gain.shape == diag.predictive_variance.shape == (1, 6, 2)
    for t in range(6):
        _, _, cov = joint_gaussian.filtered_moments(model, q[:, :t + 1], k[:, :t + 1], v[:, :t + 1],
                                                    {n: g[:, :t + 1] for n, g in gates.items()})
        gain = gates["beta"][:, t] * np.einsum("bhk,bhkj,bhj->bh", k[:, t], cov, k[:, t])
        variance = np.einsum("bhk,bhkj,bhj->bh", q[:, t], cov, q[:, t])
        np.testing.assert_allclose(diag.write_gain[:, t], gain, rtol=1e-10)
        np.testing.assert_allclose(diag.predictive_variance[:, t], variance, rtol=1e-10)
    assert np.all((diag.write_gain >= 0) & (diag.write_gain < 1))


@pytest.mark.parametrize("name", ["linear_attention", "deltanet", "longhorn"])
def test_diagnostics_of_other_families(name):
    model = NAMED[name]
    q, k, v, gates = random_inputs(model, batch=1, time=4, heads=1, key_dim=3, value_dim=2, seed=4)
    *_, diag = filters.compile(model, diagnostics=True)(q, k, v, **gates)
    key_norm2 = np.sum(k * k, -1)
    if name == "linear_attention":  # write gain |k|^2, prior variance never shrinks
        np.testing.assert_allclose(diag.write_gain, key_norm2, rtol=1e-12)
        np.testing.assert_allclose(diag.predictive_variance, np.sum(q * q, -1), rtol=1e-12)
    else:  # a reset's gain is eta |k|^2 in [0, 1)
        assert np.all((diag.write_gain >= 0) & (diag.write_gain < 1))
        assert np.all(np.asarray(diag.predictive_variance) >= 0)


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_precision_inputs(dtype, tolerance, backend):
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, time=16, seed=1)
    y_ref, _ = filters.compile(model, backend="sequential")(q, k, v, **gates)
    cast = lambda x: jnp.asarray(x, dtype)
    inputs = (cast(q), cast(k), cast(v), {n: cast(g) for n, g in gates.items()})
    parallel = _sequence_model(_compile(model, backend))[0]
    contract.assert_dtypes(parallel, inputs, readout=dtype, state=jnp.float32)   # accumulation in f32, never bf16
    assert relative_error(parallel(inputs, None)[0], y_ref) < tolerance


def test_jit_compiles_every_backend():
    model = dm.bayesian(process_noise=0.01)
    q, k, v, gates = random_inputs(model, time=8, seed=2)
    for backend in BACKENDS:
        f = _compile(model, backend)
        y, _ = jax.jit(lambda q, k, v, g: f(q, k, v, **g))(q, k, v, gates)
        assert np.all(np.isfinite(y))


def test_explain_reports_structure_and_lowerings():
    text = filters.explain(USER_EXACT_MODELS["diagonal_decay_full_covariance"])
    assert "family      exact" in text and "transition  diagonal" in text
    assert "log_decay [B,T,H,K]" in text and "associative applies" in text


@pytest.mark.parametrize("name", ["dense_transition_input_noise", "diagonal_decay_full_covariance",
                                  "dense_additive"])
def test_inapplicable_backends_say_why(name):
    model = ALL_MODELS[name]
    with pytest.raises(filters.BackendError, match=r"backend='chunked' does not apply to this design model: "
                                                   r".*; accepted here: sequential, associative"):
        filters.compile(model, backend="chunked")
    assert filters.compile(model, backend="auto").backend in ("sequential", "associative")


def test_auto_picks_chunked_where_it_applies():
    assert filters.compile(dm.gated_deltanet()).backend == "chunked"
    assert filters.compile(dm.bayesian(process_noise=0.1)).backend == "chunked"


def test_step_inputs_keep_qkv_in_their_dtype_and_gates_in_the_compute_dtype():
    """bf16 q, k, v reach the lowerings as bf16 (a kernel multiplies them on tensor cores); the gates
    and what is derived from them are in float32; every lowering computes in float32 from them."""
    from filters.checks import prepare

    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, time=8, seed=1)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    x = prepare(filters.analyze(model), bf16(q), bf16(k), bf16(v), {n: bf16(g) for n, g in gates.items()})
    assert x.q.dtype == x.k.dtype == x.v.dtype == jnp.bfloat16
    assert x.transition.dtype == x.write_strength.dtype == x.reset_variance.dtype == jnp.float32
    assert x.compute_dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in x.in_compute_dtype()[:3])
