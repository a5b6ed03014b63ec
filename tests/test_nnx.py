"""The Flax NNX layer: the same parameters and outputs as the linen one (converted both ways, parallel and
step-by-step decoding), named layers, training with nnx.Optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import designmodels as dm
import layers
import layers.nnx as lnnx
from layers import core
from tests.test_layers import MODELS

ATTRIBUTES = dict(d_model=12, num_heads=2, key_dim=4, value_dim=3, backend="sequential")


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def _decode(call_prefix, call_step, x, prefix=3):
    """The outputs of a prompt of ``prefix`` tokens, then one decoding step per remaining token."""
    y, cache = call_prefix(x[:, :prefix])
    outs = [y]
    for t in range(prefix, x.shape[1]):
        y_t, cache = call_step(x[:, t], cache)
        outs.append(y_t[:, None])
    return jnp.concatenate(outs, 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_linen_and_nnx_are_one_layer(name):
    """linen -> NNX and NNX -> linen: the same parameter tree (names, shapes, float32), the same outputs in
    the parallel form and decoding token by token."""
    linen_layer = layers.DesignLayer(MODELS[name], **ATTRIBUTES)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 12), jnp.float32)
    variables = linen_layer.init(jax.random.PRNGKey(1), x)
    expected_tree = jax.tree.map(lambda s: (s.shape, "float32"), core.parameter_tree(linen_layer.spec),
                                 is_leaf=lambda s: isinstance(s, core.ParamSpec))
    assert _shapes(variables["params"]) == expected_tree

    nnx_layer = lnnx.DesignLayer.from_linen(linen_layer, variables)
    assert _shapes(nnx_layer.linen_variables()["params"]) == expected_tree
    y = linen_layer.apply(variables, x)
    np.testing.assert_array_equal(nnx_layer(x), y)
    decoded_linen = _decode(lambda p: linen_layer.apply(variables, p, return_cache=True),
                            lambda t, c: linen_layer.apply(variables, t, c, method=layers.DesignLayer.step), x)
    decoded_nnx = _decode(lambda p: nnx_layer(p, return_cache=True), nnx_layer.step, x)
    np.testing.assert_array_equal(decoded_nnx, decoded_linen)
    np.testing.assert_allclose(decoded_nnx, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nnx_layer.readout_weights(x),
                                  linen_layer.apply(variables, x, method=layers.DesignLayer.readout_weights))

    # the other way: a freshly initialized NNX layer, run by the linen layer it converts to
    fresh = lnnx.DesignLayer(MODELS[name], **ATTRIBUTES, rngs=nnx.Rngs(5))
    back = fresh.to_linen()
    np.testing.assert_array_equal(back.apply(fresh.linen_variables(), x), fresh(x))
    assert jax.tree.structure(nnx.state(fresh, nnx.Param)) == jax.tree.structure(
        nnx.state(nnx_layer, nnx.Param))


def test_the_nnx_state_is_the_linen_variables():
    """``nnx.state(layer, nnx.Param)`` has the structure of the linen ``variables`` ({"params": ...})."""
    layer = lnnx.BayesianLayer(12, num_heads=2, key_dim=4, rngs=nnx.Rngs(0))
    state = jax.tree.map(np.asarray, nnx.state(layer, nnx.Param))
    pure = jax.tree.map(np.asarray, layer.linen_variables())
    assert jax.tree.leaves(state) and all(np.array_equal(a, b) for a, b in
                                          zip(jax.tree.leaves(state), jax.tree.leaves(pure)))
    assert jax.tree.structure(layer.linen_variables()) == jax.tree.structure(
        layers.DesignLayer(dm.bayesian(), 12, num_heads=2, key_dim=4).init(jax.random.PRNGKey(0),
                                                                         jnp.ones((1, 3, 12))))


@pytest.mark.parametrize("name", sorted(dm.NAMED_MODELS))
def test_named_nnx_layers(name):
    constructor = {"linear_attention": lnnx.LinearAttention, "retnet": lnnx.RetNet, "gla": lnnx.GLA,
                   "mamba2": lnnx.Mamba2, "deltanet": lnnx.DeltaNet, "gated_deltanet": lnnx.GatedDeltaNet,
                   "longhorn": lnnx.Longhorn, "bayesian": lnnx.BayesianLayer}[name]
    layer = constructor(8, num_heads=2, key_dim=4, rngs=nnx.Rngs(0))
    assert isinstance(layer, lnnx.DesignLayer) and layer.spec.model == dm.NAMED_MODELS[name]()
    assert layer.spec == layers.named_layer(name, 8, num_heads=2, key_dim=4).spec


def test_named_nnx_layer_options_and_errors():
    layer = lnnx.named_layer("bayesian", 8, num_heads=2, key_dim=4, process_noise=0.01, rngs=nnx.Rngs(0))
    assert layer.spec.model == dm.bayesian(process_noise=0.01)
    with pytest.raises(layers.LayerError, match="unknown layer 'mamba3'; accepted: linear_attention"):
        lnnx.named_layer("mamba3", 8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"unknown keyword num_head \(did you mean 'num_heads'\?\)"):
        lnnx.named_layer("gla", 8, num_head=2, rngs=nnx.Rngs(0))
    with pytest.raises(layers.LayerError, match=r"DesignLayer\.key_dim: got 0; accepted: an integer >= 1"):
        lnnx.DesignLayer(dm.gla(), 8, key_dim=0, rngs=nnx.Rngs(0))


def test_loading_another_layers_parameters_is_refused():
    layer = lnnx.GatedDeltaNet(8, num_heads=2, key_dim=4, rngs=nnx.Rngs(0))
    other = lnnx.GLA(8, num_heads=2, key_dim=4, rngs=nnx.Rngs(0))
    with pytest.raises(layers.LayerError, match=r"params/gates: got \['decay_proj'\]; expected the parameters"):
        layer.load_linen_variables(other.linen_variables())
    wider = lnnx.GatedDeltaNet(8, num_heads=2, key_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(layers.LayerError, match=r"params/q_proj/kernel: got shape \(8, 16\); expected \(8, 8\)"):
        layer.load_linen_variables(wider.linen_variables())


def test_nnx_training_step_reaches_every_parameter():
    """nnx.Optimizer, nnx.jit and nnx.value_and_grad: every parameter gets a gradient and the loss falls."""
    layer = lnnx.BayesianLayer(12, num_heads=2, key_dim=4, backend="sequential", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 12))
    target = jnp.roll(x, 1, axis=1)
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(5):
        loss, grads = train_step(layer, optimizer)
        losses.append(float(loss))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert flat and not zero, f"no gradient reaches {zero}"
    assert losses[-1] < losses[0]
