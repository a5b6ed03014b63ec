"""Packed variable-length batches (``cu_seqlens``, `filters.packed`): a packed row equals each sequence
run alone, for every lowering (Pallas in its interpreter), with per-sequence initial and final states,
diagnostics, gradients and ``jit``; the layers (the short convolution too) and fla's ops; the errors."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import designmodels as dm
import filters
import layers
from filters import fla
from tests.support import ALL_MODELS, BACKENDS, applies, compile_for_tests, random_inputs, random_state, \
    relative_error  # noqa: I001

# four sequences, one empty, lengths crossing chunk boundaries (chunk_size 4 in the tests)
CU = np.array([0, 6, 6, 17, 23])
N, T = len(CU) - 1, int(CU[-1])


def _alone(f, q, k, v, gates, state, n, **kw):
    """Sequence ``n`` of the packed row, run alone from ``state[n]``: ``(y or None, state)``."""
    a, b = CU[n], CU[n + 1]
    start = jax.tree.map(lambda s: s[n:n + 1], state)
    if a == b:                                       # an empty sequence keeps its initial state
        return None, start
    return f(q[:, a:b], k[:, a:b], v[:, a:b], initial_state=start, **{g: x[:, a:b] for g, x in gates.items()},
             **kw)


def _compare_states(packed_state, alone_states, tol):
    for field in ("mean", "covariance"):
        got = getattr(packed_state, field)
        want = [getattr(s, field) for s in alone_states]
        if want[0] is None:
            assert got is None
            continue
        assert got.shape[0] == N
        assert relative_error(got, np.concatenate(want)) < tol, field


# one model of every family x kind of transition (identity, scalar, diagonal, dense), fixed and run-time
# transitions (the padding must override a fixed one), every kind of noise
PACKED_MODELS = ["linear_attention", "mamba2", "gla", "dense_additive", "deltanet", "gated_deltanet",
                 "kda_style_channel_reset", "fixed_variance_reset_with_decay", "bayesian_random_walk",
                 "bayesian_stationary", "dense_transition_input_noise", "fixed_dense_full_prior",
                 "fixed_channel_decay_stationary"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PACKED_MODELS)
def test_packed_row_equals_each_sequence_alone(name, backend):
    """float64: readouts and final states (mean, and the exact family's covariance) of every sequence
    against the sequential oracle run on that sequence alone, from a per-sequence initial state."""
    model = ALL_MODELS[name]
    if not applies(model, backend):
        pytest.skip(f"{backend} does not apply to {name}")
    q, k, v, gates = random_inputs(model, batch=1, time=T, heads=2, seed=1)
    state = random_state(model, N, 2, q.shape[-1], v.shape[-1], seed=2)
    y, final = compile_for_tests(model, backend)(q, k, v, initial_state=state, cu_seqlens=CU, **gates)
    oracle = filters.compile(model, backend="sequential")
    alone = [_alone(oracle, q, k, v, gates, state, n) for n in range(N)]
    assert y.shape == v.shape
    assert relative_error(y, np.concatenate([a[0] for a in alone if a[0] is not None], axis=1)) < 1e-10
    _compare_states(final, [a[1] for a in alone], 1e-10)


def test_packed_prior_start_and_diagnostics():
    """No initial state: every sequence starts from the prior (P_0 too); the per-step diagnostics come
    back in the packed row's order."""
    model = dm.bayesian(process_noise=0.05)
    q, k, v, gates = random_inputs(model, batch=1, time=T, heads=2, seed=3)
    f = filters.compile(model, backend="sequential", diagnostics=True)
    y, final, diags = f(q, k, v, cu_seqlens=CU, **gates)
    pieces = [f(q[:, a:b], k[:, a:b], v[:, a:b], **{g: x[:, a:b] for g, x in gates.items()})
              for a, b in zip(CU[:-1], CU[1:]) if a < b]
    assert relative_error(y, np.concatenate([p[0] for p in pieces], 1)) < 1e-12
    for field in ("write_gain", "predictive_variance"):
        want = np.concatenate([getattr(p[2], field) for p in pieces], 1)
        assert relative_error(getattr(diags, field), want) < 1e-12
    prior = f.init_state(1, 2, q.shape[-1], v.shape[-1], jnp.float64)
    np.testing.assert_array_equal(final.mean[1], prior.mean[0])                  # the empty sequence
    np.testing.assert_array_equal(final.covariance[1], prior.covariance[0])


PALLAS_MODELS = {"mamba2": dm.mamba2(), "gla": dm.gla(), "gated_deltanet": dm.gated_deltanet(),
                 "bayesian": dm.bayesian(process_noise=0.05)}


@pytest.mark.parametrize("name", PALLAS_MODELS)
def test_packed_pallas_kernels_in_the_interpreter(name):
    """The Pallas kernels (interpreted) on a packed row of float32 inputs, one sequence longer than a
    chunk, against the float64 oracle on each sequence alone."""
    model = PALLAS_MODELS[name]
    cu = np.array([0, 21, 21, 28, 40])
    q, k, v, gates = random_inputs(model, batch=1, time=40, heads=2, key_dim=16, value_dim=16, seed=4)
    state = random_state(model, 4, 2, 16, 16, seed=5)
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    f = filters.compile(model, backend="pallas", chunk_size=16, precision="highest", interpret=jax.default_backend() != "gpu")
    y, final = f(as32(q), as32(k), as32(v), initial_state=jax.tree.map(as32, state), cu_seqlens=cu,
                 **{g: as32(x) for g, x in gates.items()})
    oracle = filters.compile(model, backend="sequential")
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        start = jax.tree.map(lambda s: s[n:n + 1], state)
        if a == b:
            np.testing.assert_allclose(final.mean[n], start.mean[0], rtol=1e-6)
            continue
        want_y, want = oracle(q[:, a:b], k[:, a:b], v[:, a:b], initial_state=start,
                              **{g: x[:, a:b] for g, x in gates.items()})
        assert relative_error(y[:, a:b], want_y) < 1e-5
        assert relative_error(final.mean[n:n + 1], want.mean) < 1e-5


@pytest.mark.parametrize("name,backend", [("gated_deltanet", "associative"), ("bayesian_random_walk", "chunked")])
def test_packed_gradients_equal_those_of_the_sequences_alone(name, backend):
    """Reverse mode through the gathers: the gradient of a loss on the packed readouts and final states,
    with respect to every input and the initial states, is that of the sequences run alone."""
    model = ALL_MODELS.get(name) or dm.NAMED_MODELS[name]()
    q, k, v, gates = random_inputs(model, batch=1, time=T, heads=2, seed=6)
    state = random_state(model, N, 2, q.shape[-1], v.shape[-1], seed=7).mean
    f = compile_for_tests(model, backend)
    w = np.random.default_rng(8).normal(size=v.shape)
    c = np.random.default_rng(9).normal(size=state.shape)

    def packed_loss(inputs, s0):
        y, final = f(*inputs[:3], initial_state=s0, cu_seqlens=CU, validate=False, **inputs[3])
        return jnp.sum(y * w) + jnp.sum(final.mean * c)

    def alone_loss(inputs, s0):
        total = 0.0
        for n, (a, b) in enumerate(zip(CU[:-1], CU[1:])):
            if a == b:
                total = total + jnp.sum(s0[n] * c[n])
                continue
            cut = jax.tree.map(lambda x: x[:, a:b], inputs)
            y, final = f(*cut[:3], initial_state=s0[n:n + 1], validate=False, **cut[3])
            total = total + jnp.sum(y * w[:, a:b]) + jnp.sum(final.mean * c[n:n + 1])
        return total

    args = ((q, k, v, gates), state)
    got = jax.grad(packed_loss, argnums=(0, 1))(*args)
    want = jax.grad(alone_loss, argnums=(0, 1))(*args)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert relative_error(g, h) < 1e-10


def test_packed_under_jit_needs_max_seqlen_and_checks_it():
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=1, time=T, heads=2, seed=10)
    f = compile_for_tests(model, "chunked")
    eager = f(q, k, v, cu_seqlens=CU, **gates)
    jitted = jax.jit(lambda cu, m=11: f(q, k, v, cu_seqlens=cu, max_seqlen=m, **gates), static_argnums=1)
    y, final = jitted(jnp.asarray(CU))
    assert relative_error(y, eager[0]) < 1e-12 and relative_error(final.mean, eager[1].mean) < 1e-12
    with pytest.raises(filters.FilterInputError, match=r"max_seqlen: needed when cu_seqlens is traced"):
        jax.jit(lambda cu: f(q, k, v, cu_seqlens=cu, **gates))(jnp.asarray(CU))
    with pytest.raises(filters.FilterInputError, match=re.escape(
            "max_seqlen: 1 invalid entries, first at index (2,): sequence length cu_seqlens[n + 1] - "
            "cu_seqlens[n] = 11; accepted: every sequence at most max_seqlen = 10 steps")):
        with filters.reraise_input_errors():
            jax.block_until_ready(jitted(jnp.asarray(CU), 10))
    bad = np.array([0, 6, 3, 17, 23])
    with pytest.raises(filters.FilterInputError, match=re.escape(
            "cu_seqlens: 1 invalid entries, first at index (1,): cu_seqlens[n + 1] - cu_seqlens[n] = -3")):
        with filters.reraise_input_errors():
            jax.block_until_ready(jitted(jnp.asarray(bad), 23))


BAD = [
    (dict(cu_seqlens=np.array([1, 6, 17, 23])), r"cu_seqlens\[0\]: 1 invalid entries, first at index \(0,\): "
                                                r"cu_seqlens\[0\] = 1; accepted: 0"),
    (dict(cu_seqlens=np.array([0, 9, 6, 23])), r"cu_seqlens: 1 invalid entries, first at index \(1,\): "
                                               r"cu_seqlens\[n \+ 1\] - cu_seqlens\[n\] = -3; accepted: integers"),
    (dict(cu_seqlens=np.array([0, 6, 20])), r"cu_seqlens\[-1\]: 1 invalid entries, first at index \(0,\): "
                                            r"cu_seqlens\[-1\] = 20; accepted: T = 23, the length of the packed row"),
    (dict(cu_seqlens=np.array([0.0, 23.0])), r"cu_seqlens: got dtype float64; accepted: integers \[N \+ 1\]"),
    (dict(cu_seqlens=np.array([[0, 23]])), r"cu_seqlens: got shape \(1, 2\); accepted"),
    (dict(cu_seqlens=np.array([0])), r"cu_seqlens: got shape \(1,\); accepted"),
    (dict(cu_seqlens="0,23"), r"cu_seqlens: got str; accepted"),
    (dict(cu_seqlens=CU, max_seqlen=5), r"max_seqlen: 3 invalid entries, first at index \(0,\): sequence length "
                                        r"cu_seqlens\[n \+ 1\] - cu_seqlens\[n\] = 6"),
    (dict(cu_seqlens=CU, max_seqlen=0), r"max_seqlen=0: accepted: a Python int >= 1"),
    (dict(cu_seqlen=CU), r"cu_seqlen: not an input of this design model .*\(did you mean 'cu_seqlens'"),
    (dict(max_seqlen=8), r"max_seqlen=8: the padded length of packed sequences, given without cu_seqlens"),
    (dict(cu_seqlens=CU, initial_state=np.zeros((1, 2, 4, 5))),
     r"initial_state.mean: got shape \(1, 2, 4, 5\); expected S \[B, H, K, V\] = \(4, 2, 4, 5\)"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_cu_seqlens_say_what_is_accepted(kwargs, message):
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=1, time=T, heads=2, seed=11)
    with pytest.raises(filters.FilterInputError, match=message):
        filters.compile(model, backend="sequential")(q, k, v, **kwargs, **gates)


def test_an_empty_row_keeps_every_initial_state():
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=1, time=0, heads=2, seed=15)
    state = random_state(model, 2, 2, 4, 5, seed=16)
    y, final = filters.compile(model, backend="chunked")(q, k, v, initial_state=state, cu_seqlens=np.array([0, 0, 0]),
                                                         **gates)
    assert y.shape == (1, 0, 2, 5)
    np.testing.assert_array_equal(final.mean, state.mean)


def test_packed_batch_must_be_one_row():
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=2, time=T, heads=2, seed=12)
    with pytest.raises(filters.FilterInputError, match=re.escape(
            "q: got batch B = 2 with cu_seqlens; a packed batch is one row [1, T, H, ...]")):
        filters.compile(model, backend="sequential")(q, k, v, cu_seqlens=CU, **gates)


# ----------------------------------------------------------------------------------------------------
# the layers

def test_short_convolution_does_not_reach_across_a_boundary():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, T, 3))
    positions = filters.packed.positions(jnp.asarray(CU), T)[1]
    np.testing.assert_array_equal(positions, np.concatenate([np.arange(b - a) for a, b in zip(CU[:-1], CU[1:])]))
    y, _ = layers.core.short_conv(kernel, x, positions=positions)
    want = jnp.concatenate([layers.core.short_conv(kernel, x[:, a:b])[0] for a, b in zip(CU[:-1], CU[1:]) if a < b], 1)
    assert relative_error(y, want) < 1e-12


def test_layer_on_a_packed_row_equals_each_sequence_alone():
    """The short convolution (size 4) and the filter restart at every boundary: each sequence's outputs
    are those of the layer applied to it alone; linen and NNX alike, eager and under jit."""
    layer = layers.named_layer("gated_deltanet", 16, num_heads=2, key_dim=8, conv_size=4, backend="chunked")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, T, 16))
    params = layer.init(jax.random.PRNGKey(1), x[:, :5])
    y = layer.apply(params, x, cu_seqlens=CU)
    want = jnp.concatenate([layer.apply(params, x[:, a:b]) for a, b in zip(CU[:-1], CU[1:]) if a < b], axis=1)
    assert relative_error(y, want) < 1e-5
    jitted = jax.jit(lambda p, x, cu: layer.apply(p, x, cu_seqlens=cu, max_seqlen=T))(params, x, jnp.asarray(CU))
    assert relative_error(jitted, want) < 1e-5
    nnx_layer = layers.nnx.DesignLayer.from_linen(layer, params)
    assert relative_error(nnx_layer(x, cu_seqlens=CU), want) < 1e-5


def test_packed_layer_refuses_a_cache():
    layer = layers.named_layer("gated_deltanet", 16, num_heads=2, key_dim=8)
    x = jnp.ones((1, T, 16))
    params = layer.init(jax.random.PRNGKey(1), x)
    with pytest.raises(layers.LayerError, match=r"cu_seqlens: a packed row is filtered from the prior"):
        layer.apply(params, x, cu_seqlens=CU, return_cache=True)
    with pytest.raises(filters.FilterInputError, match=r"cu_seqlens\[-1\]: 1 invalid entries"):
        layer.apply(params, x, cu_seqlens=np.array([0, 5]))


# ----------------------------------------------------------------------------------------------------
# fla's ops

def test_fla_ops_take_cu_seqlens():
    """fla's convention: q [1, T, H, K], initial_state [N, H, K, V], final_state [N, H, K, V]; equal to
    calling the op on each sequence alone (the recurrent op reversed inside each sequence too)."""
    rng = np.random.default_rng(13)
    q, k = (jnp.asarray(rng.normal(size=(1, T, 2, 8))) for _ in range(2))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jnp.asarray(rng.normal(size=(1, T, 2, 8)))
    g = jnp.asarray(-rng.uniform(0.01, 0.5, size=(1, T, 2)))
    beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(1, T, 2)))
    h0 = jnp.asarray(rng.normal(size=(N, 2, 8, 8)))
    ops = [(fla.chunk_gated_delta_rule, dict(g=g, beta=beta), {}),
           (fla.fused_recurrent_simple_gla, dict(g=g), dict(reverse=True)),
           (fla.chunk_simple_gla, dict(g=g), dict(state_v_first=True))]
    for op, gates, options in ops:
        o, final = op(q, k, v, **gates, initial_state=h0, output_final_state=True, cu_seqlens=CU, **options)
        assert final.shape == (N, 2, 8, 8)
        for n, (a, b) in enumerate(zip(CU[:-1], CU[1:])):
            if a == b:
                np.testing.assert_array_equal(final[n], h0[n])
                continue
            on, fn = op(q[:, a:b], k[:, a:b], v[:, a:b], **{name: x[:, a:b] for name, x in gates.items()},
                        initial_state=h0[n:n + 1], output_final_state=True, **options)
            assert relative_error(o[:, a:b], on) < 1e-10, op.__name__
            assert relative_error(final[n:n + 1], fn) < 1e-10, op.__name__


def test_fla_packed_under_jit_reads_the_length_from_cu_seqlens_cpu():
    """fla's host copy ``cu_seqlens_cpu`` gives the padded length when ``cu_seqlens`` is traced."""
    rng = np.random.default_rng(14)
    q, k, v = (jnp.asarray(rng.normal(size=(1, T, 2, 8))) for _ in range(3))
    g = jnp.asarray(-rng.uniform(0.01, 0.5, size=(1, T, 2, 8)))
    eager, _ = fla.chunk_gla(q, k, v, g, cu_seqlens=CU)
    jitted, _ = jax.jit(lambda cu: fla.chunk_gla(q, k, v, g, cu_seqlens=cu, cu_seqlens_cpu=CU))(jnp.asarray(CU))
    assert relative_error(jitted, eager) < 1e-12
    with pytest.raises(filters.FilterInputError, match="max_seqlen: needed when cu_seqlens is traced"):
        jax.jit(lambda cu: fla.chunk_gla(q, k, v, g, cu_seqlens=cu))(jnp.asarray(CU))
