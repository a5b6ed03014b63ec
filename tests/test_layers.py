"""The Flax layer: any design model, every backend; decoding with a cache equals the parallel form;
gradients reach every parameter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import layers
from tests.test_filters import USER_EXACT_MODELS, USER_OTHER_MODELS

MODELS = {**{n: f() for n, f in dm.NAMED_MODELS.items()},
          "dense_transition_input_noise": USER_EXACT_MODELS["dense_transition_input_noise"],
          "kda_style_channel_reset": USER_OTHER_MODELS["kda_style_channel_reset"]}


def _layer(model, backend, conv_size=4):
    return layers.DesignLayer(model, d_model=12, num_heads=2, key_dim=4, value_dim=3, backend=backend,
                              conv_size=conv_size)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_then_decode_equals_parallel(name):
    layer = _layer(MODELS[name], "sequential")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 12), jnp.float32)
    params = layer.init(jax.random.PRNGKey(1), x)
    y = layer.apply(params, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    prefix, cache = layer.apply(params, x[:, :3], return_cache=True)
    outs = [prefix]
    for t in range(3, 7):
        y_t, cache = layer.apply(params, x[:, t], cache, method=layers.DesignLayer.step)
        outs.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "bayesian", "dense_transition_input_noise"])
@pytest.mark.parametrize("backend", ["sequential", "associative"])
def test_gradients_reach_every_parameter(name, backend):
    layer = _layer(MODELS[name], backend)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 12))
    params = layer.init(jax.random.PRNGKey(3), x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.all(np.isfinite(g)) for _, g in flat)
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(g)]
    assert not zero, f"no gradient reaches {zero}"


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
    with pytest.raises(layers.LayerError, match="unknown layer 'mamba3'; accepted: linear_attention"):
        layers.named_layer("mamba3", d_model=8)


@pytest.mark.parametrize("backend", ["sequential", "associative", "chunked"])
def test_an_empty_batch_gives_an_empty_output(backend):
    """A batch of 0 sequences (e.g. the last shard of a split) is a valid input: empty output, the state
    of 0 sequences, and a decoding step of 0 rows."""
    layer = _layer(dm.gated_deltanet(), backend)
    params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 6, 12)))
    y, cache = layer.apply(params, jnp.ones((0, 6, 12)), return_cache=True)
    assert y.shape == (0, 6, 12) and cache["filter"].mean.shape[0] == 0
    y_t, _ = layer.apply(params, jnp.ones((0, 12)), cache, method=layers.DesignLayer.step)
    assert y_t.shape == (0, 12)


def test_parameters_are_float32_even_with_x64():
    layer = _layer(dm.mamba2(), "sequential")
    params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 12), jnp.float32))
    dtypes = {jax.tree_util.keystr(p): leaf.dtype for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert all(d == jnp.float32 for d in dtypes.values()), dtypes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_readout_weights_reproduce_the_filter_readout(name):
    """``y_t = sum_s W[t, s] v_s`` with `readout_weights`, for every family (the gates and keys do not depend
    on the values), from a zero state: causal, and equal to the filter run on the layer's own values."""
    layer = _layer(MODELS[name], "sequential")
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 9, 12), jnp.float32)
    params = layer.init(jax.random.PRNGKey(9), x)
    weights = layer.apply(params, x, method=layers.DesignLayer.readout_weights)
    assert weights.shape == (2, 2, 9, 9)                               # [B, H, T(t), T(s)]
    assert np.all(np.asarray(weights)[..., np.triu_indices(9, 1)[0], np.triu_indices(9, 1)[1]] == 0)

    def filtered(module, x):
        q, k, v, gates, _ = module._features(x, None)
        return module.filter(q, k, v, **gates)[0], v

    y, v = layer.apply(params, x, method=filtered)
    np.testing.assert_allclose(jnp.einsum("bhts,bshv->bthv", weights, v), y, rtol=1e-4, atol=1e-5)


def test_memory_span_of_known_readouts():
    time = 8
    current = np.broadcast_to(np.eye(time), (1, 2, time, time))        # reads only the current step
    previous = np.broadcast_to(np.eye(time, k=-1) + np.diag([1.0] + [0.0] * (time - 1)), (1, 2, time, time))
    uniform = np.broadcast_to(np.tril(np.ones((time, time))), (1, 2, time, time))
    span = layers.memory_span(current)
    np.testing.assert_allclose(span["mean_lag"], 0)
    np.testing.assert_allclose(span["current"], 1)
    np.testing.assert_allclose(span["previous"], 0)
    span = layers.memory_span(-previous, start=1)                      # absolute weights
    np.testing.assert_allclose(span["mean_lag"], 1)
    np.testing.assert_allclose(span["previous"], 1)
    span = layers.memory_span(uniform, start=4)                        # t = 4..7: lag t / 2, shares 1 / (t + 1)
    np.testing.assert_allclose(span["mean_lag"], np.mean(np.arange(4, 8) / 2))
    np.testing.assert_allclose(span["current"], np.mean(1 / np.arange(5, 9)))
    with pytest.raises(layers.LayerError, match=r"memory_span: start=8; accepted: 0 <= start < T = 8"):
        layers.memory_span(uniform, start=8)
