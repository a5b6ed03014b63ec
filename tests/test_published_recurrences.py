"""Cross-checks of the independent published-recurrence oracles against each other (float64).

Every check is between two *different* formulas (recurrent vs quadratic form, or two papers'
recurrences that coincide on a special case), so agreement is evidence that both are right.
Shapes are reused across tests on purpose: each new shape costs an XLA compilation.
"""
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import published_recurrences as pr  # noqa: E402

RTOL = 1e-12
B, H, K, V = 2, 3, 4, 3  # several heads, K != V
T_FULL, T_SPLITS = 8, (1, 7)  # T=1 and an odd T; T_FULL = sum of splits
# (B, T, H, K, V) for recurrent == parallel: T=1, odd T, the split total, and a long odd single-head one.
SHAPES = [(B, 1, H, K, V), (B, 7, H, K, V), (B, T_FULL, H, K, V), (1, 33, 1, 2, 5)]


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def make_inputs(shape, seed, unit_keys=True):
    b, t, h, dk, dv = shape
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, t, h, dk))
    if unit_keys:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    x = dict(
        q=rng.standard_normal((b, t, h, dk)),
        k=k,
        v=rng.standard_normal((b, t, h, dv)),
        ld=np.log(rng.uniform(0.5, 1.0, (b, t, h))),  # per-head log-decay, decay in (0.5, 1)
        ldk=np.log(rng.uniform(0.5, 1.0, (b, t, h, dk))),  # per-key-channel log-decay (GLA)
        beta=rng.uniform(0.05, 0.95, (b, t, h)),
        dt=rng.uniform(0.1, 2.0, (b, t, h)),
        m0=rng.standard_normal((b, h, dk, dv)),
    )
    return {n: jnp.asarray(a) for n, a in x.items()}


def runners(x):
    """Each layer as run(time_slice, initial_state) -> (o, final_state)."""
    q, k, v, ld, ldk, beta, dt = (x[n] for n in ("q", "k", "v", "ld", "ldk", "beta", "dt"))
    A = -0.3
    return {
        "linear_attention": lambda s, m: pr.linear_attention(q[:, s], k[:, s], v[:, s], initial_state=m),
        "retnet": lambda s, m: pr.retnet(q[:, s], k[:, s], v[:, s], 0.85, initial_state=m),
        "gla": lambda s, m: pr.gla(q[:, s], k[:, s], v[:, s], ldk[:, s], initial_state=m),
        "mamba2": lambda s, m: pr.mamba2(q[:, s], k[:, s], v[:, s], A * dt[:, s], dt[:, s], initial_state=m),
        "deltanet": lambda s, m: pr.deltanet(q[:, s], k[:, s], v[:, s], beta[:, s], initial_state=m),
        "gated_deltanet": lambda s, m: pr.gated_deltanet(q[:, s], k[:, s], v[:, s], ld[:, s], beta[:, s],
                                                         initial_state=m),
        "longhorn": lambda s, m: pr.longhorn(q[:, s], k[:, s], v[:, s], 3.0 * beta[:, s], initial_state=m),
    }


# ---------------------------------------------------------------- recurrent == parallel

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dT%dH%dK%dV%d" % s)
def test_additive_recurrent_equals_parallel(shape):
    x = make_inputs(shape, seed=sum(shape), unit_keys=False)
    q, k, v, dt = x["q"], x["k"], x["v"], x["dt"]
    o, _ = pr.linear_attention(q, k, v)
    assert rel_err(o, pr.linear_attention_parallel(q, k, v)) < RTOL
    for gamma in (1.0, 0.9, 0.37):
        o, _ = pr.retnet(q, k, v, gamma)
        assert rel_err(o, pr.retnet_parallel(q, k, v, gamma)) < RTOL
    o, _ = pr.gla(q, k, v, x["ldk"])
    assert rel_err(o, pr.gla_parallel(q, k, v, x["ldk"])) < RTOL
    ld = -0.4 * dt  # log_decay = dt * A with A = -0.4
    o, _ = pr.mamba2(q, k, v, ld, dt)
    assert rel_err(o, pr.mamba2_parallel(q, k, v, ld, dt)) < RTOL


# ---------------------------------------------------------------- special-case identities

FULL = (B, T_FULL, H, K, V)


def test_retnet_gamma_one_is_linear_attention():
    x = make_inputs(FULL, seed=1)
    o1, s1 = pr.retnet(x["q"], x["k"], x["v"], 1.0, initial_state=x["m0"])
    o2, s2 = pr.linear_attention(x["q"], x["k"], x["v"], initial_state=x["m0"])
    assert rel_err(o1, o2) < RTOL and rel_err(s1, s2) < RTOL


def test_gla_scalar_decay_is_mamba2_dt_one_and_retnet():
    x = make_inputs(FULL, seed=2)
    ld = x["ld"]
    ld_k = jnp.broadcast_to(ld[..., None], x["q"].shape)
    o1, s1 = pr.gla(x["q"], x["k"], x["v"], ld_k, initial_state=x["m0"])
    o2, s2 = pr.mamba2(x["q"], x["k"], x["v"], ld, jnp.ones_like(ld), initial_state=x["m0"])
    assert rel_err(o1, o2) < RTOL and rel_err(s1, s2) < RTOL
    # RetNet is GLA with a constant scalar decay
    gamma = 0.8
    o3, s3 = pr.retnet(x["q"], x["k"], x["v"], gamma, initial_state=x["m0"])
    o4, s4 = pr.gla(x["q"], x["k"], x["v"], jnp.full(x["q"].shape, np.log(gamma)), initial_state=x["m0"])
    assert rel_err(o3, o4) < RTOL and rel_err(s3, s4) < RTOL


def test_gated_deltanet_without_decay_is_deltanet():
    x = make_inputs(FULL, seed=3)
    o1, s1 = pr.gated_deltanet(x["q"], x["k"], x["v"], jnp.zeros_like(x["ld"]), x["beta"], initial_state=x["m0"])
    o2, s2 = pr.deltanet(x["q"], x["k"], x["v"], x["beta"], initial_state=x["m0"])
    assert rel_err(o1, o2) < RTOL and rel_err(s1, s2) < RTOL


def test_longhorn_reparametrised_is_deltanet():
    x = make_inputs(FULL, seed=4)  # unit keys
    b = x["beta"]
    beta_lh = b / (1 - b * jnp.sum(x["k"] ** 2, axis=-1))  # then eps = beta / (1 + beta |k|^2) = b
    o1, s1 = pr.longhorn(x["q"], x["k"], x["v"], beta_lh, initial_state=x["m0"])
    o2, s2 = pr.deltanet(x["q"], x["k"], x["v"], b, initial_state=x["m0"])
    assert rel_err(o1, o2) < RTOL and rel_err(s1, s2) < RTOL


# ---------------------------------------------------------------- initial_state / continuation

@pytest.mark.parametrize("t1", [T_SPLITS[0], T_SPLITS[1]])
def test_initial_state_continuation(t1):
    x = make_inputs(FULL, seed=5 + t1)
    for name, run in runners(x).items():
        for m0 in (None, x["m0"]):
            o_full, s_full = run(slice(None), m0)
            o_a, s_a = run(slice(0, t1), m0)
            o_b, s_b = run(slice(t1, None), s_a)
            assert rel_err(jnp.concatenate([o_a, o_b], axis=1), o_full) < RTOL, name
            assert rel_err(s_b, s_full) < RTOL, name


def test_none_initial_state_is_zeros_and_readout_is_state_times_query():
    x = make_inputs(FULL, seed=11)
    zeros = jnp.zeros_like(x["m0"])
    for name, run in runners(x).items():
        o1, s1 = run(slice(None), None)
        o2, s2 = run(slice(None), zeros)
        assert rel_err(o1, o2) == 0 and rel_err(s1, s2) == 0, name
        # o_t = S_t^T q_t in the common [B, H, K, V] layout (checked at the last step)
        o, s = run(slice(None), x["m0"])
        assert rel_err(o[:, -1], jnp.einsum("bhkv,bhk->bhv", s, x["q"][:, -1])) < RTOL, name


def test_dtype_is_never_cast_down():
    x = make_inputs((B, 1, H, K, V), seed=13)
    x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
    o, s = pr.linear_attention(x32["q"], x32["k"], x32["v"])
    assert o.dtype == s.dtype == jnp.float32
    o, s = pr.deltanet(x32["q"], x32["k"], x32["v"], x32["beta"], initial_state=x32["m0"])
    assert o.dtype == s.dtype == jnp.float32
    # float32 state with float64 inputs: computed (and returned) in float64
    o, s = pr.deltanet(x["q"], x["k"], x["v"], x["beta"], initial_state=x32["m0"])
    assert o.dtype == s.dtype == jnp.float64
