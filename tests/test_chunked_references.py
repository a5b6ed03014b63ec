"""The chunked references of the fused kernels (`filters.chunked.additive`, `delta_rule`,
`covariance_pass`): their fixed signatures, and each against a plain per-step recurrence written here
from its docstring, in float64, over chunk sizes that pad, cut and exceed the sequence; one chunk of one
head against the same recurrence (the per-chunk mathematics the module docstring writes)."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from filters import chunked

B, T, H, K, V = 2, 11, 3, 4, 5


def _inputs(seed, decay):
    rng = np.random.default_rng(seed)
    q, k, w = (rng.normal(size=(B, T, H, K)) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    w = 0.5 * k * rng.uniform(0.1, 0.9, size=(B, T, H, 1)) + 0.1 * w
    v = rng.normal(size=(B, T, H, V))
    log_decay = {"none": None, "scalar": -rng.uniform(0.01, 0.7, size=(B, T, H)),
                 "channel": -rng.uniform(0.01, 0.7, size=(B, T, H, K))}[decay]
    s0 = rng.normal(size=(B, H, K, V))
    return q, k, w, v, log_decay, s0


def _decays(log_decay):
    """``a_t`` as ``[B, T, H, K]`` (ones without decay)."""
    if log_decay is None:
        return np.ones((B, T, H, K))
    a = np.exp(log_decay)
    return a if a.ndim == 4 else np.repeat(a[..., None], K, -1)


def _delta_recurrence(q, k, w, v, log_decay, s0, erase=True):
    """``S_t = A_t S_{t-1} + w_t (v_t - (A_t S_{t-1})^T k_t)^T`` (``erase=False``: ``+ k_t v_t^T``)."""
    a, s, ys = _decays(log_decay), np.array(s0), []
    for t in range(T):
        s = a[:, t, :, :, None] * s
        if erase:
            s = s + np.einsum("bhk,bhv->bhkv", w[:, t], v[:, t] - np.einsum("bhkv,bhk->bhv", s, k[:, t]))
        else:
            s = s + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        ys.append(np.einsum("bhkv,bhk->bhv", s, q[:, t]))
    return np.stack(ys, 1), s


CHUNKS = [1, 4, 11, 16]


@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_additive_and_delta_rule_equal_their_recurrences(decay):
    q, k, w, v, log_decay, s0 = _inputs(0, decay)
    y_add, s_add = _delta_recurrence(q, k, w, v, log_decay, s0, erase=False)
    y_delta, s_delta = _delta_recurrence(q, k, w, v, log_decay, s0)
    for chunk in CHUNKS:
        y, s = chunked.additive(q, k, v, log_decay, s0, chunk_size=chunk)
        np.testing.assert_allclose(y, y_add, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(s, s_add, rtol=1e-10, atol=1e-10)
        y, s = chunked.delta_rule(q, k, w, v, log_decay, s0, chunk_size=chunk)
        np.testing.assert_allclose(y, y_delta, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(s, s_delta, rtol=1e-10, atol=1e-10)


def _covariance_recurrence(q, k, log_decay, noise, precision, p0):
    """The exact step's covariance half: ``P_bar = a^2 P + q I``, ``Kg = P_bar k / (k^T P_bar k + 1/beta)``,
    ``P = P_bar - P_bar k Kg^T``; the predictive variance ``q^T P q``."""
    a = np.ones((B, T, H)) if log_decay is None else np.exp(log_decay)
    p, gains, variance = np.array(p0), [], []
    for t in range(T):
        p_bar = a[:, t, :, None, None] ** 2 * p + noise[:, t, :, None, None] * np.eye(K)
        u = np.einsum("bhij,bhj->bhi", p_bar, k[:, t])
        gain = u / (np.sum(u * k[:, t], -1) + 1 / precision[:, t])[..., None]
        p = p_bar - u[..., :, None] * gain[..., None, :]
        gains.append(gain)
        variance.append(np.einsum("bhi,bhij,bhj->bh", q[:, t], p, q[:, t]))
    return np.stack(gains, 1), p, np.stack(variance, 1)


@pytest.mark.parametrize("decay", ["none", "scalar"])
def test_covariance_pass_equals_its_recurrence(decay):
    q, k, _, _, log_decay, _ = _inputs(1, decay)
    rng = np.random.default_rng(2)
    noise = rng.uniform(0, 0.3, size=(B, T, H))
    precision = rng.uniform(0.2, 5.0, size=(B, T, H))
    m = rng.normal(size=(B, H, K, K))
    p0 = m @ np.swapaxes(m, -1, -2) / K + 0.3 * np.eye(K)
    gains_ref, p_ref, variance_ref = _covariance_recurrence(q, k, log_decay, noise, precision, p0)
    for chunk in CHUNKS:
        gains, p, variance = chunked.covariance_pass(q, k, log_decay, noise, precision, p0, chunk_size=chunk,
                                                     variance=True)
        np.testing.assert_allclose(gains, gains_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(p, p_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(variance, variance_ref, rtol=1e-10, atol=1e-10)
    assert chunked.covariance_pass(q, k, log_decay, noise, precision, p0, chunk_size=4, variance=False)[2] is None


def test_one_chunk_of_one_head_is_the_docstring_mathematics():
    """The per-chunk functions, unbatched: one chunk of one head from S_0, against the recurrence."""
    q, k, w, v, log_decay, s0 = _inputs(3, "channel")
    c = slice(0, 8)
    one = lambda x: jnp.asarray(x[0, c, 1])                               # chunk c of head 1 of sequence 0
    # the recurrence on that one head, from S_0 of that head
    a = np.exp(log_decay[0, c, 1])
    s, ys = np.array(s0[0, 1]), []
    for t in range(8):
        s = a[t][:, None] * s
        s = s + np.outer(w[0, t, 1], v[0, t, 1] - s.T @ k[0, t, 1])
        ys.append(s.T @ q[0, t, 1])
    terms = chunked._delta_chunk(one(q), one(k), one(w), one(v), one(log_decay))
    assert isinstance(terms, chunked.DeltaChunk) and terms.readers.shape == (16, K)
    s_end, y = chunked._delta_step(jnp.asarray(s0[0, 1]), terms)
    np.testing.assert_allclose(y, np.stack(ys), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(s_end, s, rtol=1e-10, atol=1e-10)


def test_any_float_dtype_in_the_compute_dtype_out():
    q, k, w, v, log_decay, s0 = _inputs(4, "scalar")
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    y, s = chunked.delta_rule(bf16(q), bf16(k), bf16(w), bf16(v), f32(log_decay), f32(s0), chunk_size=4)
    assert y.dtype == s.dtype == jnp.float32
    y64, _ = chunked.delta_rule(q, k, w, v, log_decay, s0, chunk_size=4)
    assert y64.dtype == jnp.float64
    np.testing.assert_allclose(y, y64, rtol=0.05, atol=0.05)


def test_the_kernel_signatures_are_the_contract():
    """The Pallas kernels take exactly these arguments: keep them (names, order, keyword-only)."""
    def names(fn):
        return [(p.name, p.kind.name) for p in inspect.signature(fn).parameters.values()]

    positional = "POSITIONAL_OR_KEYWORD"
    assert names(chunked.additive) == [(n, positional) for n in ("q", "k", "v", "log_decay", "initial_state")] + [
        ("chunk_size", "KEYWORD_ONLY")]
    assert names(chunked.delta_rule) == [(n, positional) for n in ("q", "k", "w", "v", "log_decay",
                                                                     "initial_state")] + [("chunk_size", "KEYWORD_ONLY")]
    assert names(chunked.covariance_pass) == [(n, positional) for n in (
        "q", "k", "log_decay", "noise", "precision", "initial_covariance")] + [
        ("chunk_size", "KEYWORD_ONLY"), ("variance", "KEYWORD_ONLY"), ("key_noise", "KEYWORD_ONLY")]
    from filters.pallas import covariance               # the kernel's: the reference's, then its own options
    assert names(covariance.covariance_pass)[:9] == names(chunked.covariance_pass)


def test_gradients_through_the_references_are_finite():
    q, k, w, v, log_decay, s0 = _inputs(5, "channel")
    loss = lambda q, k, w, v, s0: jnp.sum(chunked.delta_rule(q, k, w, v, log_decay, s0, chunk_size=4)[0] ** 2)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, w, v, s0)
    assert all(np.all(np.isfinite(g)) for g in grads)
