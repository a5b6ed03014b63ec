"""The Flax layer: any design model, every backend; decoding with a cache equals the parallel form;
gradients reach every parameter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import layers
from tests import contract
from tests.support import LAYER_MODELS as MODELS


def _layer(model, backend, conv_size=4):
    return layers.DesignLayer(model, d_model=12, num_heads=2, key_dim=4, value_dim=3, backend=backend,
                              conv_size=conv_size)


def _sequence_model(layer, params):
    """A layer as the test contract sees it: ``(parallel, step)`` on ``x [B, T, D]`` and its cache."""
    def parallel(x, cache):
        return layer.apply(params, x, cache, return_cache=True)

    def step(cache, x_t):
        return layer.apply(params, x_t, cache, method=layers.DesignLayer.step)

    return parallel, step


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_then_decode_equals_parallel_and_batch_rows_are_independent(name):
    layer = _layer(MODELS[name], "sequential")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 12), jnp.float32)
    params = layer.init(jax.random.PRNGKey(1), x)
    parallel, step = _sequence_model(layer, params)
    contract.assert_step_equals_parallel(parallel, step, x, split=3, rtol=1e-5, atol=1e-5)
    contract.assert_batch_independent(parallel, x, rtol=1e-5, atol=1e-6)
    contract.assert_dtypes(parallel, x, readout=jnp.float32, state=jnp.float32)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "bayesian", "dense_transition_input_noise"])
@pytest.mark.parametrize("backend", ["sequential", "associative"])
def test_gradients_reach_every_parameter(name, backend):
    layer = _layer(MODELS[name], backend)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 12))
    params = layer.init(jax.random.PRNGKey(3), x)
    contract.assert_gradients_reach(lambda p: jnp.sum(layer.apply(p, x) ** 2), params)


def test_backends_give_the_same_layer():
    layer_s, layer_a = _layer(dm.bayesian(process_noise=0.01), "sequential"), _layer(
        dm.bayesian(process_noise=0.01), "associative")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 12))
    params = layer_s.init(jax.random.PRNGKey(5), x)
    np.testing.assert_allclose(layer_a.apply(params, x), layer_s.apply(params, x), rtol=1e-4, atol=1e-5)


def test_gates_are_in_range_by_construction():
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 5, 12)) * 10
    for model in (dm.mamba2(), dm.gla(), dm.deltanet(), dm.bayesian(), MODELS["dense_transition_input_noise"]):
        gates = layers.Gates(model, num_heads=2, key_dim=4)
        g, _ = gates.init_with_output(jax.random.PRNGKey(7), x)
        for name, value in g.items():
            assert np.all(np.isfinite(value)), name
        if "log_decay" in g:
            assert np.all(np.asarray(g["log_decay"]) <= 0)
        if "beta" in g:
            assert np.all(np.asarray(g["beta"]) > 0)
        if "transition" in g:
            assert np.all(np.linalg.norm(np.asarray(g["transition"]), ord=2, axis=(-2, -1)) <= 1 + 1e-6)


def test_named_layer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown layer 'mamba3'; accepted: linear_attention"):
        layers.named_layer("mamba3", d_model=8)


def test_parameters_are_float32_even_with_x64():
    layer = _layer(dm.mamba2(), "sequential")
    params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 12), jnp.float32))
    dtypes = {jax.tree_util.keystr(p): leaf.dtype for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert all(d == jnp.float32 for d in dtypes.values()), dtypes
