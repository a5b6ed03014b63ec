"""The model table of the recall experiments (`experiments.models.MODELS`): every layer with a short
convolution has a convolution-free form, and every layer whose memory decays reads recent steps more than
the first ones (the Bayesian Layer forgets towards its prior; without process noise it could not)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import layers
from experiments import models

D_MODEL, HEAD_DIM, TIME = 32, 8, 48
WITH_CONV = [n for n in models.MODELS if not n.endswith(models.NO_CONV)]


def _mixer(name, conv_size=4):
    return models.sequence_layer(name, D_MODEL, HEAD_DIM, "sequential", conv_size)


@pytest.mark.parametrize("name", WITH_CONV)
def test_every_layer_has_a_convolution_free_form(name):
    """``<name>_no_conv`` is the same layer with ``conv_size = 0`` whatever the config's ``conv_size``: the same
    parameters less the three convolutions, and the same design model."""
    assert name + models.NO_CONV in models.MODELS
    x = jnp.ones((1, 5, D_MODEL))
    with_conv, without = _mixer(name), _mixer(name + models.NO_CONV, conv_size=4)
    assert with_conv.conv_size == 4 and without.conv_size == 0
    if isinstance(with_conv, layers.DesignLayer):
        assert without.model == with_conv.model
    params = {n: jax.tree.map(jnp.shape, m.init(jax.random.PRNGKey(0), x)["params"]) for n, m in
              (("with", with_conv), ("without", without))}
    convs = {f"{c}_conv" for c in "qkv"}
    assert convs <= set(params["with"]) and not convs & set(params["without"])
    assert {k: v for k, v in params["with"].items() if k not in convs} == params["without"]


def test_the_no_conv_names_are_the_table_s_layers_and_nothing_else():
    no_conv = {n for n in models.MODELS if n.endswith(models.NO_CONV)}
    assert no_conv == {n + models.NO_CONV for n in WITH_CONV}
    with pytest.raises(ValueError, match=r"\['mamba2_noconv'\] not known \(did you mean 'mamba2_no_conv'"):
        models.check_models(["mamba2_noconv"])


def _first_and_current_weights(name, seed):
    """Per head, the mean share of the readout at ``t >= T/2`` on the current step and on the first step of
    the sequence, for the layer at initialisation on unit-variance inputs (a first layer's inputs after its
    LayerNorm)."""
    mixer = _mixer(name)
    x = jax.random.normal(jax.random.PRNGKey(seed), (4, TIME, D_MODEL))
    params = mixer.init(jax.random.PRNGKey(seed + 1), x)
    w = np.abs(np.asarray(mixer.apply(params, x, method=layers.DesignLayer.readout_weights)))
    w = w / w.sum(-1, keepdims=True)
    late = np.arange(TIME // 2, TIME)
    return w[..., late, late].mean((0, 2)), w[..., late, 0].mean((0, 2))


DECAYING = [n for n in WITH_CONV if n != "attention" and not isinstance(
    models.sequence_layer(n, D_MODEL, HEAD_DIM, "sequential", 4).model.transition, dm.Identity)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", [n for n in DECAYING if n != models.LEGACY_BAYESIAN])
def test_a_decaying_memory_reads_its_recent_steps_more_than_its_first(name, seed):
    """At initialisation, every head of a layer whose memory decays puts more of its late readouts on the
    current step than on the first step of the sequence: its memory can be short, which a first layer needs
    to carry a key to the value after it. (The Bayesian Layer's stationary process noise makes this so;
    without it, see the next test.)"""
    assert "bayesian" in DECAYING
    current, first = _first_and_current_weights(name, seed)
    assert np.all(current > first), (current, first)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_decay_without_process_noise_holds_the_first_steps(seed):
    """The defect the table's Bayesian Layer no longer has: with a decay ``a_t < 1`` and no process noise the
    covariance contracts, ``P_t = a_t^2 P_{t-1}`` before each write, so the write gain ``beta k^T P k`` falls
    towards 0 and the readout is held by the first steps (every head: the first step weighs more than the
    current one)."""
    current, first = _first_and_current_weights(models.LEGACY_BAYESIAN, seed)
    assert np.all(first > current), (current, first)


@pytest.mark.parametrize("noise", ["none", "stationary"])
def test_the_readout_weights_of_a_decaying_exact_filter_in_closed_form(noise):
    """One address ``c`` (unit key and query), constant decay ``a`` and precision ``beta``, ``P_0 = 1``: the
    scalar covariance along ``c`` is ``p_bar_t = a^2 p_{t-1} (+ 1 - a^2 with stationary noise)``, the gain
    ``g_t = beta p_bar_t / (1 + beta p_bar_t)``, ``p_t = (1 - g_t) p_bar_t``, and the readout weights
    ``W[t, s] = g_s prod_{r = s+1..t} a (1 - g_r)``. Without noise ``g_t ~ beta a^(2t) / D`` and
    ``W[t, s] ~ a^(t + s)``: an older step weighs ``1 / a`` times more than the next (docs/results/mqar/no_conv.md).
    """
    import filters

    a, beta, time = 0.8, 4.0, 24
    model = dm.bayesian(noise="stationary") if noise == "stationary" else dm.bayesian()
    c = jnp.zeros((1, time, 1, 3), jnp.float64).at[..., 0].set(1.0)
    eye = jnp.eye(time, dtype=jnp.float64)[None, :, None, :]
    gates = {"log_decay": jnp.full((1, time, 1), np.log(a)), "beta": jnp.full((1, time, 1), beta)}
    w = np.asarray(filters.compile(model, backend="sequential")(c, c, eye, **gates)[0])[0, :, 0]    # [t, s]
    p, gains = 1.0, []
    for _ in range(time):
        p_bar = a * a * p + (1 - a * a if noise == "stationary" else 0.0)
        gains.append(beta * p_bar / (1 + beta * p_bar))
        p = (1 - gains[-1]) * p_bar
    expected = np.array([[gains[s] * np.prod([a * (1 - gains[r]) for r in range(s + 1, t + 1)]) if s <= t else 0.0
                          for s in range(time)] for t in range(time)])
    np.testing.assert_allclose(w, expected, rtol=1e-10, atol=1e-300)
    late = w[-1, time // 2:]                                  # the last readout's weights on its later half
    ratios = late[1:] / late[:-1]                            # each step against the one before it
    if noise == "none":
        np.testing.assert_allclose(ratios, a, rtol=0.02)     # W[t, s] ~ a^(t + s): the older weighs more
    else:
        assert np.all(ratios > 1)                             # recency: the newer weighs more


def _random_walk_steady_gain(a, beta, q):
    """The steady-state gain ``g*`` of one address under ``p_bar = a^2 p + q``, ``g = beta p_bar / (1 + beta
    p_bar)``, ``p = (1 - g) p_bar``: with ``x = beta p_bar`` and ``r = beta q`` the fixed point solves
    ``x^2 + (1 - a^2 - r) x - r = 0`` (the positive root), and ``g* = x / (1 + x)``."""
    r, b = beta * q, 1 - a * a - beta * q
    x = (-b + np.sqrt(b * b + 4 * r)) / 2
    return x / (1 + x)


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
@pytest.mark.parametrize("a", [1.0, 0.9])
def test_input_dependent_random_walk_noise_gives_a_constant_gain_at_any_decay(a, backend):
    """``Q_t = q_t I`` (``bayesian(process_noise="input")``) forgets the memory's *certainty* without shrinking
    its mean: along one address (a random unit key and query, constant ``a``, ``beta``, ``q``) the gain
    settles at ``g*`` of `_random_walk_steady_gain`, also at ``a = 1`` (``g* in (0, 1)`` with
    ``x^2 - beta q x - beta q = 0``), and the readout weights become the delta rule's,
    ``W[t, s] = g* (a (1 - g*))^(t - s)``: recency whatever the decay. Stationary noise vanishes at
    ``a = 1``, where the gain falls like ``1 / (beta t)`` (ridge regression: every step weighs alike).
    """
    import filters

    beta, q, time = 4.0, 0.05, 64
    key = np.random.default_rng(0).normal(size=3)
    c = jnp.broadcast_to(jnp.asarray(key / np.linalg.norm(key)), (1, time, 1, 3))
    eye = jnp.eye(time, dtype=jnp.float64)[None, :, None, :]
    full = lambda value: jnp.full((1, time, 1), value, jnp.float64)
    gates = {"log_decay": full(np.log(a)), "beta": full(beta)}
    options = {"chunk_size": 16} if backend == "chunked" else {}     # 4 chunks: their boundaries crossed
    w = np.asarray(filters.compile(dm.bayesian(process_noise="input"), backend=backend, **options)(
        c, c, eye, process_noise=full(q), **gates)[0])[0, :, 0]                      # [t, s]
    g = _random_walk_steady_gain(a, beta, q)
    assert 0 < g < 1
    lags = np.arange(16)
    np.testing.assert_allclose(w[-1, time - 1 - lags], g * (a * (1 - g)) ** lags, rtol=1e-6)
    if a == 1.0:    # no decay at all: the same readout, and stationary noise has no floor there
        w_none = np.asarray(filters.compile(dm.bayesian(process_noise="input", decay="none"), backend=backend,
                                            **options)(
            c, c, eye, process_noise=full(q), beta=full(beta))[0])[0, :, 0]
        np.testing.assert_allclose(w_none, w, rtol=1e-10, atol=1e-14)
        w_stat = np.asarray(filters.compile(dm.bayesian(noise="stationary"), backend=backend, **options)(
            c, c, eye, **gates)[0])[0, :, 0]
        np.testing.assert_allclose(w_stat[-1, :], beta / (1 + beta * time), rtol=1e-6)


def test_process_noise_input_is_a_run_time_random_walk_and_nothing_else():
    model = dm.bayesian(process_noise="input")
    assert model.noise == dm.RandomWalk(None) and "process_noise" in model.runtime_inputs
    with pytest.raises(dm.DesignModelError, match=r"process_noise='input', noise='stationary'.*accepted"):
        dm.bayesian(process_noise="input", noise="stationary")
    with pytest.raises(dm.DesignModelError, match=r"'inptu' \(did you mean 'input'\?\).*accepted"):
        dm.bayesian(process_noise="inptu")


def test_a_hybrid_language_model_takes_one_model_per_layer():
    """``LanguageModel((first, second))``: block i is built from entry i (here the convolution tells them apart);
    a tuple of the wrong length is refused, naming both lengths."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    hybrid = models.LanguageModel(("gated_deltanet", "bayesian_no_conv"), 16, D_MODEL, head_dim=HEAD_DIM)
    params = hybrid.init(jax.random.PRNGKey(0), tokens)["params"]
    assert "q_conv" in params["block_0"]["mixer"] and "q_conv" not in params["block_1"]["mixer"]
    assert "beta_proj" in params["block_1"]["mixer"]["gates"]
    with pytest.raises(ValueError, match=r"got 1 per-layer models.*num_layers=2; accepted"):
        models.LanguageModel(("gla",), 16, D_MODEL, head_dim=HEAD_DIM).init(jax.random.PRNGKey(0), tokens)
