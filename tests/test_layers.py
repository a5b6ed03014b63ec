"""The Flax layer: any design model, every backend; decoding with a cache equals the parallel form;
gradients reach every parameter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
import layers
from tests import contract
from tests.support import LAYER_MODELS as MODELS, USER_EXACT_MODELS


def _layer(model, backend, conv_size=4, chunk_size=None):
    return layers.DesignLayer(model, d_model=12, num_heads=2, key_dim=4, value_dim=3, backend=backend,
                              conv_size=conv_size, chunk_size=chunk_size)


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


@pytest.mark.parametrize("name", ["gated_deltanet", "bayesian"])
def test_a_zero_input_gives_a_finite_output(name):
    """A zero input (e.g. a zero embedding) gives zero queries and keys after the convolution; their
    L2 normalization must keep them finite (zero), not divide by zero."""
    layer = _layer(MODELS[name], "sequential")
    x = jnp.zeros((1, 4, 12), jnp.float32)
    y = layer.apply(layer.init(jax.random.PRNGKey(0), x + 1.0), x)
    assert np.all(np.isfinite(y))


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
        q, k, v, gates, _ = layers.core.features(module.spec, module._params(), x)
        return module.spec.filter(q, k, v, **gates)[0], v

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


# ----------------------------------------------------------------------------------------------------
# Gate ranges, asserted at their bounds: every projection weight is set to zero, so that each gate is its
# parameterization (layers/gates.py) at a chosen pre-activation, and saturating pre-activations (+-30)
# must reach each documented bound and not cross it.
# ----------------------------------------------------------------------------------------------------

def _gates_at(model, pre_activation, heads=2, key_dim=4, a_log=np.log(2.0), **attributes):
    """The gates of ``model`` with zero projection kernels, every bias (and ``dt_bias``) equal to
    ``pre_activation`` and ``A_log = a_log``."""
    gates = layers.Gates(model, num_heads=heads, key_dim=key_dim, **attributes)
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 3, 12))
    params = gates.init(jax.random.PRNGKey(9), x)

    def value(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            return jnp.zeros_like(leaf)
        if "A_log" in name:
            return jnp.full_like(leaf, a_log)
        return jnp.full_like(leaf, pre_activation)           # bias, dt_bias
    params = jax.tree_util.tree_map_with_path(value, params)
    return {n: np.asarray(g, np.float64) for n, g in gates.apply(params, x).items()}


def test_write_strength_gate_spans_zero_to_one():
    """DeltaNet's ``beta = sigmoid(.)``: in (0, 1) (float32 saturates to 1 at the top), reaching both ends."""
    low, high = _gates_at(dm.deltanet(), -30.0)["beta"], _gates_at(dm.deltanet(), 30.0)["beta"]
    assert np.all(low > 0) and np.all(low < 1e-12)
    assert np.all(high <= 1) and np.all(high > 1 - 1e-6)
    np.testing.assert_allclose(_gates_at(dm.deltanet(), 0.0)["beta"], 0.5, rtol=1e-6)


@pytest.mark.parametrize("bounds", [{}, {"beta_min": 0.25, "beta_max": 3.0}], ids=["default", "custom"])
def test_precision_gate_stays_in_its_bounds(bounds):
    """The Bayesian Layer's precision ``beta_min + (beta_max - beta_min) sigmoid(.)``: bounded below by
    ``beta_min`` (default 0.01, which keeps the chunked factorizations well conditioned) and above by
    ``beta_max`` (default 16), and reaching both."""
    beta_min, beta_max = bounds.get("beta_min", 0.01), bounds.get("beta_max", 16.0)
    low = _gates_at(dm.bayesian(), -30.0, **bounds)["beta"]
    high = _gates_at(dm.bayesian(), 30.0, **bounds)["beta"]
    assert np.all(low >= beta_min * (1 - 1e-6)) and np.all(high <= beta_max * (1 + 1e-6))
    np.testing.assert_allclose(low, beta_min, rtol=1e-5)
    np.testing.assert_allclose(high, beta_max, rtol=1e-6)
    np.testing.assert_allclose(_gates_at(dm.bayesian(), 0.0, **bounds)["beta"], (beta_min + beta_max) / 2, rtol=1e-6)


def test_scalar_decay_and_input_scale_gates():
    """Mamba-2: ``dt = softplus(.) > 0`` and ``log_decay = -exp(A_log) dt`` in (-inf, 0), one shared ``dt``;
    Gated DeltaNet's decay has the same form."""
    for pre_activation, dt in ((-30.0, np.log1p(np.exp(-30.0))), (0.0, np.log(2.0)), (30.0, 30.0)):
        mamba = _gates_at(dm.mamba2(), pre_activation)
        assert np.all(mamba["input_scale"] > 0)
        np.testing.assert_allclose(mamba["input_scale"], dt, rtol=1e-5)
        np.testing.assert_allclose(mamba["log_decay"], -2.0 * dt, rtol=1e-5)     # exp(A_log) = 2
        assert np.all(mamba["log_decay"] < 0)
        np.testing.assert_allclose(_gates_at(dm.gated_deltanet(), pre_activation)["log_decay"], -2.0 * dt, rtol=1e-5)


@pytest.mark.parametrize("model", [dm.gated_deltanet(), dm.mamba2()], ids=["gated_deltanet", "mamba2"])
def test_the_decay_at_init_is_the_documented_one_for_every_token(model):
    """At init ``dt = softplus(x W + dt_bias)`` is the documented ``softplus(dt_bias)`` (log-uniform in
    [1e-3, 0.1]) up to a small token-dependent factor, as in fla's and Mamba-2's models (their gate
    projections start from N(0, 0.02^2)), on the LayerNorm'd input the layer sees (unit variance, d = 128).
    With the Dense default (lecun_normal: ``x W ~ N(0, 1)``) the mean dt over tokens was 1.65 times it:
    the heads forgot a key 1.65 times faster than documented (the Gated DeltaNet diagnosis of
    docs/results/mqar/README.md)."""
    gates = layers.Gates(model, num_heads=4, key_dim=32)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 32, 128))              # unit variance, as after LayerNorm
    ratios = []
    for seed in range(4):
        params = gates.init(jax.random.PRNGKey(seed), x)
        dt = -gates.apply(params, x)["log_decay"] / jnp.exp(params["params"]["A_log"])     # [B, T, H]
        documented = jax.nn.softplus(params["params"]["dt_bias"])
        assert np.all((documented > 1e-3 * (1 - 1e-5)) & (documented < 0.1 * (1 + 1e-5)))
        ratios.append(np.asarray(jnp.mean(dt, axis=(0, 1)) / documented))
    ratios = np.concatenate(ratios)
    assert np.all(np.abs(ratios - 1) < 0.1), ratios        # lecun_normal: about 1.65


def test_a_log_starts_in_mamba2s_range():
    """``exp(A_log)`` is drawn uniformly from Mamba-2's ``[1, 16]`` (the decay rates per unit dt): every
    head inside it, and its ends reached (256 heads; a range of [1, 17] would put about 15 of them above 16)."""
    gates = layers.Gates(dm.mamba2(), num_heads=256, key_dim=4)
    rate = jnp.exp(gates.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 8)))["params"]["A_log"])
    assert float(rate.min()) >= 1.0 * (1 - 1e-6) and float(rate.max()) <= 16.0 * (1 + 1e-6)
    assert float(rate.min()) < 1.5 and float(rate.max()) > 15.5


def test_the_projections_have_no_bias():
    """As in the published layers (fla's GatedDeltaNet, Mamba-2's projections): q, k, v, the output gate
    and the output projection are bias-free matrices; only the gate heads carry biases."""
    layer = layers.DesignLayer(dm.gated_deltanet(), d_model=16, num_heads=2, key_dim=8)
    params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 16)))["params"]
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "out_proj"):
        assert set(params[name]) == {"kernel"}, (name, set(params[name]))

def test_channel_decay_gate_is_a_low_temperature_log_sigmoid():
    """GLA's ``log_decay = log_sigmoid(.) / 16``: in (-inf, 0), near 0 when saturated high."""
    high, low = _gates_at(dm.gla(), 30.0)["log_decay"], _gates_at(dm.gla(), -30.0)["log_decay"]
    assert high.shape == (2, 3, 2, 4)
    assert np.all(high <= 0) and np.all(high > -1e-12)
    np.testing.assert_allclose(low, -30.0 / 16, rtol=1e-6)
    custom = layers.Gates(dm.gla(), num_heads=2, key_dim=4, gate_logit_normalizer=4.0)
    x = jnp.zeros((1, 2, 12))
    params = jax.tree_util.tree_map(lambda p: jnp.full_like(p, -8.0), custom.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(custom.apply(params, x)["log_decay"], jax.nn.log_sigmoid(-8.0) / 4.0, rtol=1e-6)


def test_process_noise_gate_is_non_negative_and_starts_small():
    """``softplus(. - 4)``: >= 0, about 0.018 at a zero pre-activation, 0 when saturated low."""
    model = USER_EXACT_MODELS["dense_transition_input_noise"]
    np.testing.assert_allclose(_gates_at(model, 0.0)["process_noise"], np.log1p(np.exp(-4.0)), rtol=1e-6)
    low = _gates_at(model, -30.0)["process_noise"]
    assert np.all(low >= 0) and np.all(low < 1e-12)
    np.testing.assert_allclose(_gates_at(model, 30.0)["process_noise"], 26.0, rtol=1e-6)


def test_dense_transition_gate_has_frobenius_norm_at_most_one():
    """``A = Z / max(1, ||Z||_F)`` with ``Z = I + (x W + b)``: a large ``Z`` is scaled to norm exactly 1, a
    small one is kept as it is."""
    model = USER_EXACT_MODELS["dense_transition_input_noise"]
    gates = layers.Gates(model, num_heads=2, key_dim=4)
    x = jnp.ones((1, 2, 12))
    params = gates.init(jax.random.PRNGKey(0), x)

    def transition(bias):
        p = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.zeros_like(leaf) if "kernel" in jax.tree_util.keystr(path) else leaf, params)
        p["params"]["transition_proj"]["bias"] = jnp.tile(bias.reshape(-1), 2)
        return np.asarray(gates.apply(p, x)["transition"], np.float64)

    eye = np.eye(4)
    large = transition(jnp.zeros(16))                       # Z = I, ||Z||_F = 2
    np.testing.assert_allclose(large, np.broadcast_to(eye / 2, large.shape), rtol=1e-6)
    small = transition(jnp.asarray(-0.9 * eye).reshape(-1))  # Z = 0.1 I, ||Z||_F = 0.2: unchanged
    np.testing.assert_allclose(small, np.broadcast_to(0.1 * eye, small.shape), rtol=1e-5)
    assert np.all(np.linalg.norm(large, axis=(-2, -1)) <= 1 + 1e-6)


# ----------------------------------------------------------------------------------------------------
# Layer state across calls: a prompt filtered in two calls that pass the cache equals one call.
# ----------------------------------------------------------------------------------------------------

SPLIT_CASES = [(name, "sequential") for name in sorted(MODELS)] + [
    ("gated_deltanet", "chunked"), ("bayesian", "chunked"), ("gla", "associative")]


@pytest.mark.parametrize("name,backend", SPLIT_CASES)
def test_prefill_in_two_calls_equals_one_call(name, backend):
    """The output and the final cache (filter state and convolution buffers) of ``x[:, :2]`` then
    ``x[:, 2:]`` with the cache passed between them equal one call over ``x``. The first part is shorter
    than the convolution's history (``conv_size - 1 = 3``), so the history must carry across calls."""
    layer = _layer(MODELS[name], backend, chunk_size=4 if backend == "chunked" else None)   # 2 chunks of 7 steps
    x = jax.random.normal(jax.random.PRNGKey(10), (2, 7, 12), jnp.float32)
    params = layer.init(jax.random.PRNGKey(11), x)
    y, cache = layer.apply(params, x, return_cache=True)
    first, mid = layer.apply(params, x[:, :2], return_cache=True)
    second, end = layer.apply(params, x[:, 2:], mid, return_cache=True)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), y, rtol=1e-5, atol=1e-5)
    assert jax.tree_util.tree_structure(end) == jax.tree_util.tree_structure(cache)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cache), jax.tree_util.tree_leaves(end)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_only_a_named_model_string_gets_the_named_model_hint():
    """``DesignLayer("mamba2", ...)`` says how to build the named model; a string that names no model,
    and any other object, gets only what is accepted (no hint pointing at a model that does not exist)."""
    with pytest.raises(layers.LayerError, match=r"dm.NAMED_MODELS\['mamba2'\]\(\) or layers.named_layer"):
        layers.DesignLayer("mamba2", d_model=8)
    for wrong in ("mamba3", 5):
        with pytest.raises(layers.LayerError, match="accepted: a designmodels.DesignModel") as error:
            layers.DesignLayer(wrong, d_model=8)
        assert "NAMED_MODELS" not in str(error.value)


def test_the_chunk_size_reaches_the_filter_and_is_checked_at_construction():
    """``chunk_size`` is the filter's compile option: the layer's filter takes it (the same output as the
    default chunk, to round-off) and a size the lowering refuses is an error when the layer is built,
    with the lowering's message; linen, NNX and the conversions between them keep it."""
    from flax import nnx
    import layers.nnx as lnnx
    model = MODELS["gated_deltanet"]
    small, default = _layer(model, "chunked", chunk_size=16), _layer(model, "chunked")
    assert small.spec.filter.options == {"chunk_size": 16} and default.spec.filter.options == {}
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 20, 12), jnp.float32)
    params = default.init(jax.random.PRNGKey(4), x)
    np.testing.assert_allclose(small.apply(params, x), default.apply(params, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(filters.BackendError, match=r"chunk_size=48: the pallas lowering takes 16, 32, 64 or 128"):
        _layer(model, "pallas", chunk_size=48)
    layer = lnnx.DesignLayer(model, 12, num_heads=2, key_dim=4, chunk_size=32, rngs=nnx.Rngs(0))
    assert layer.spec.chunk_size == 32 and layer.to_linen().chunk_size == 32
    linen = layer.to_linen()
    assert lnnx.DesignLayer.from_linen(linen, linen.init(jax.random.PRNGKey(0), x)).spec.chunk_size == 32
