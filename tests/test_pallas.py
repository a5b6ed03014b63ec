"""The Pallas kernels on a CPU: each run in Pallas's interpreter, and its plain-JAX reference, against
an independent float64 recurrence (outputs, final states and the gradients of every input), at small
shapes that cross chunk boundaries and padding; and the kernels lowered for CUDA on this machine, so a
kernel that cannot compile fails here, not on a user's GPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from filters.pallas import common, covariance, delta_rule, gla

RNG = np.random.default_rng(20261130)
B, T, H, K, V = 1, 37, 2, 16, 16          # T is not a multiple of the chunk: the last chunk is padded
# The kernels themselves: in Pallas's interpreter on a CPU, compiled by Triton on a GPU (so that
# `pytest tests/test_pallas.py` on the GPU runs every kernel test for real: the interpreter accepts
# programs the compiler rejects).
INTERPRET = jax.default_backend() != "gpu"


def _recurrence(q, k, w, v, log_decay, s0, *, erase, channelwise=False):
    """``S_t = a_t S_{t-1} + w_t u_t^T`` (``u_t = v_t - (a_t S_{t-1})^T k_t`` if erase, else ``v_t``),
    ``y_t = S_t^T q_t``, step by step in float64: written from the equations, not from the kernels."""
    def step(state, x):
        q_t, k_t, w_t, v_t, a_t = x
        decayed = (jnp.exp(a_t)[..., :, None] if channelwise else jnp.exp(a_t)[..., None, None]) * state
        u = v_t - jnp.einsum("bhkv,bhk->bhv", decayed, k_t) if erase else v_t
        state = decayed + jnp.einsum("bhk,bhv->bhkv", w_t, u)
        return state, jnp.einsum("bhkv,bhk->bhv", state, q_t)
    final, ys = jax.lax.scan(step, s0, [jnp.moveaxis(x, 1, 0) for x in (q, k, w, v, log_decay)])
    return jnp.moveaxis(ys, 0, 1), final


def _inputs(channelwise=False):
    q, k = RNG.normal(size=(B, T, H, K)), RNG.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = RNG.normal(size=(B, T, H, V))
    beta = RNG.uniform(0.1, 0.9, size=(B, T, H))
    log_decay = -RNG.uniform(0.01, 0.6, size=(B, T, H, K) if channelwise else (B, T, H))
    s0 = 0.3 * RNG.normal(size=(B, H, K, V))
    return q, k, v, beta, log_decay, s0


def _relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _check(ours, oracle, args, *, tol=5e-6, symmetric=()):
    """Outputs, final state and every gradient of ``sum(y r) + sum(S r')`` against the oracle. The
    gradients of the arguments in ``symmetric`` (covariances) are compared on symmetric directions."""
    weights = [RNG.normal(size=x.shape) for x in oracle(*args)]

    def loss(f, *a):
        return sum(jnp.sum(o * r) for o, r in zip(f(*a), weights))

    args64 = tuple(jnp.asarray(a, jnp.float64) for a in args)
    args32 = tuple(a.astype(jnp.float32) for a in args64)
    for got, want in zip(jax.jit(ours)(*args32), jax.jit(oracle)(*args64)):    # jitted: faster than op by op
        assert _relative(got, want) < tol
    grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=tuple(range(len(args)))))(*args32)
    want = jax.jit(jax.grad(lambda *a: loss(oracle, *a), argnums=tuple(range(len(args)))))(*args64)
    sym = lambda x: 0.5 * (x + jnp.swapaxes(x, -1, -2))
    for i, (g, w) in enumerate(zip(grads, want)):
        if i in symmetric:
            g, w = sym(g), sym(w)
        assert _relative(g, w) < tol


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "no_decay"])
def test_delta_rule(interpret, decay):
    q, k, v, beta, log_decay, s0 = _inputs()
    w = beta[..., None] * k
    args = (q, k, w, v, log_decay, s0) if decay else (q, k, w, v, s0)

    def ours(*a):
        q_, k_, w_, v_, *rest = a
        ld, s = rest if decay else (None, rest[0])
        return delta_rule.delta_rule(q_, k_, w_, v_, ld, s, chunk_size=16, precision="highest", interpret=interpret)

    def oracle(*a):
        q_, k_, w_, v_, *rest = a
        ld, s = rest if decay else (jnp.zeros(q_.shape[:3], q_.dtype), rest[0])
        return _recurrence(q_, k_, w_, v_, ld, s, erase=True)

    _check(ours, oracle, args)


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "reference"])
def test_delta_rule_channelwise_decay(interpret):
    """KDA-style (a decay per key channel): the state kernels with ``b [C, K]``, GLA's output and chunk
    backward kernels on ``(Q, W, U)``, the prepare's derivative, against the float64
    recurrence; chunks of 32 (two 16-row blocks of ``L`` and ``A``), the last one padded."""
    q, k, v, beta, log_decay, s0 = _inputs(channelwise=True)
    w = beta[..., None] * k
    ours = lambda *a: delta_rule.delta_rule(*a, chunk_size=32, precision="highest", interpret=interpret)
    oracle = lambda q_, k_, w_, v_, ld, s: _recurrence(q_, k_, w_, v_, ld, s, erase=True, channelwise=True)
    _check(ours, oracle, (q, k, w, v, log_decay, s0))


@pytest.mark.parametrize("reload", [True, False], ids=["through_memory", "in_registers"])
def test_prepare_inverts_every_block_of_a_long_chunk(reload, monkeypatch):
    """The UT transform of a 64-step chunk (four 16 x 16 diagonal blocks and their block products), both
    ways the kernel can assemble it, with ``L`` by 16-row tiles or one full-tile product, against ``(I +
    L)^{-1}`` computed densely in float64."""
    from filters.pallas import common
    monkeypatch.setitem(common.TUNING, "delta_rule_prepare", dict(num_warps=2, reload=reload))
    chunk = time = 64                     # one head, one chunk: the interpreter is slow
    q, k, v, beta, log_decay, _ = (np.asarray(x)[:, :, :1] for x in _inputs())
    k, v = np.resize(k, (B, time, 1, K)), np.resize(v, (B, time, 1, V))
    w = np.resize(beta, (B, time, 1))[..., None] * k
    b = np.asarray(common.chunk_log_decay(jnp.asarray(np.resize(log_decay, (B, time, 1))), B, time, 1, chunk))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    wp, up, inv = delta_rule.prepare_kernel(f32(k), f32(w), f32(v), f32(b), chunk=chunk,
                                            dots=common.Dots(jnp.float32, "highest"), interpret=INTERPRET)
    for c in range(time // chunk):
        span = slice(c * chunk, (c + 1) * chunk)
        kc, wc, vc, bc = k[0, span, 0], w[0, span, 0], v[0, span, 0], b[0, span, 0]
        lower = np.tril(kc @ wc.T * np.exp(bc[:, None] - bc[None, :]), -1)
        t = np.linalg.inv(np.eye(chunk) + lower)
        assert _relative(inv[0, span, 0], t) < 1e-5
        assert _relative(wp[0, span, 0], t @ (kc * np.exp(bc)[:, None])) < 1e-5
        assert _relative(up[0, span, 0], t @ vc) < 1e-5


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "reference"])
def test_additive_scalar_decay(interpret):
    q, k, v, _, log_decay, s0 = _inputs()
    _check(lambda q_, k_, v_, ld, s: delta_rule.additive(q_, k_, v_, ld, s, chunk_size=16, precision="highest",
                                                        interpret=interpret),
           lambda q_, k_, v_, ld, s: _recurrence(q_, k_, k_, v_, ld, s, erase=False),
           (q, k, v, log_decay, s0))


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "reference"])
def test_additive_channelwise_decay(interpret):
    q, k, v, _, log_decay, s0 = _inputs(channelwise=True)
    _check(lambda q_, k_, v_, ld, s: gla.additive(q_, k_, v_, ld, s, chunk_size=32, precision="highest",
                                                 interpret=interpret),
           lambda q_, k_, v_, ld, s: _recurrence(q_, k_, k_, v_, ld, s, erase=False, channelwise=True),
           (q, k, v, log_decay, s0))


@pytest.mark.parametrize("dtype, key_dim, value_dim, chunk, keep_states, strongest", [
    ("bfloat16", 32, 16, 16, True, 0.6), ("bfloat16", 32, 16, 32, False, 0.6),
    ("float32", 16, 256, 64, False, 4.0), ("float32", 16, 256, 64, True, 4.0)])
def test_gla_kernels_forward_and_gradients(monkeypatch, dtype, key_dim, value_dim, chunk, keep_states, strongest):
    """The channel-wise kernels and their backward kernels in the interpreter, K != V (V = 256: value
    blocks of 128 in the backward, 2 readout programs per chunk), chunk sizes
    the sub-blocks tile differently (1 block per chunk at 16, 4 at 64), the last chunk padded, against
    the float64 recurrence on the same (rounded) inputs; bf16 with the default products (bf16 on tensor
    cores), float32 with TF32-free "highest"; the chunk states kept from the forward, or recomputed.
    Decays down to exp(-4) per step: a chunk's decay reaches exp(-128), which a kernel that split
    exp(b_i - b_j) into exp(b_i) exp(-b_j) would overflow (float32 ends at exp(88))."""
    monkeypatch.setitem(common.TUNING, "gla_backward", dict(recompute_states=not keep_states))
    low = jnp.dtype(dtype) == jnp.bfloat16
    q, k = RNG.normal(size=(B, T, H, key_dim)), RNG.normal(size=(B, T, H, key_dim))
    v = RNG.normal(size=(B, T, H, value_dim))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    log_decay = -RNG.uniform(0.01, strongest, size=(B, T, H, key_dim))
    s0 = 0.3 * RNG.normal(size=(B, H, key_dim, value_dim))
    rounded = [jnp.asarray(jnp.asarray(x, dtype), jnp.float64) for x in (q, k, v)]
    args64 = (*rounded, *(jnp.asarray(np.float32(x), jnp.float64) for x in (log_decay, s0)))
    weights = [jnp.asarray(RNG.normal(size=shape)) for shape in ((B, T, H, value_dim), s0.shape)]

    def ours(q_, k_, v_, ld, s):
        return gla.additive(q_.astype(dtype), k_.astype(dtype), v_.astype(dtype), ld, s, chunk_size=chunk,
                            precision="default" if low else "highest", interpret=INTERPRET)

    oracle = lambda q_, k_, v_, ld, s: _recurrence(q_, k_, k_, v_, ld, s, erase=False, channelwise=True)
    loss = lambda f, *a: sum(jnp.sum(o.astype(jnp.float64) * r) for o, r in zip(f(*a), weights))
    # bf16: 2-4e-3 measured (y itself is rounded to bf16). float32: up to 3.3e-6 measured with the strong
    # decays (the reference's as much): the float32 cumulative log decay, down to -130, carries about
    # |b| eps into every exponential.
    tol = 1e-2 if low else 1e-5
    y, final = ours(*(a.astype(jnp.float32) for a in args64))
    want_y, want_final = oracle(*args64)
    assert y.dtype == jnp.dtype(dtype) and final.dtype == jnp.float32
    assert _relative(y, want_y) < tol and _relative(final, want_final) < tol
    argnums = tuple(range(5))
    grads = jax.grad(lambda *a: loss(ours, *a), argnums)(*(a.astype(jnp.float32) for a in args64))
    want = jax.grad(lambda *a: loss(oracle, *a), argnums)(*args64)
    for got, expected in zip(grads, want):
        assert _relative(got, expected) < tol


def _kalman_covariance(k, log_decay, noise, beta, p0, key_noise=False):
    """The exact filter's covariance recursion step by step: ``P_bar = a^2 P + q I`` (``key_noise``:
    ``+ q k k^T``), ``u = P_bar k``, ``Kg = u / (k^T u + 1/beta)``, ``P = P_bar - u Kg^T``; returns the gains
    and the final P."""
    def step(cov, x):
        k_t, a_t, q_t, b_t = x
        added = k_t[..., :, None] * k_t[..., None, :] if key_noise else jnp.eye(k.shape[-1])
        cov = jnp.exp(2 * a_t)[..., None, None] * cov + q_t[..., None, None] * added
        u = jnp.einsum("bhij,bhj->bhi", cov, k_t)
        gain = u / (jnp.sum(k_t * u, -1) + 1 / b_t)[..., None]
        return cov - u[..., :, None] * gain[..., None, :], gain
    final, gains = jax.lax.scan(step, p0, [jnp.moveaxis(x, 1, 0) for x in (k, log_decay, noise, beta)])
    return jnp.moveaxis(gains, 0, 1), final


@pytest.mark.parametrize("interpret, dot_precision, block, checkpoints", [
    (True, "default", 16, "forward"), (True, "highest", 16, "forward"), (True, "default", 32, "forward"),
    (True, "default", 16, "rerun"), (False, "default", 16, "forward")],
    ids=["kernel", "kernel_ieee", "kernel_blocks_of_32", "kernel_checkpoints_rerun", "reference"])
def test_covariance_pass(monkeypatch, interpret, dot_precision, block, checkpoints):
    """Gains, final covariance and every gradient (the backward kernel's, through its checkpoints; T = 37
    with chunks of 32: the last padded) against the float64 step-by-step recursion. The two products
    take their own TUNING forms; blocks of 16 or 32 steps; the checkpoints (P at the start of every
    block) kept from the forward pass, or stored by a rerun of the forward kernel in the backward pass."""
    products = "ieee" if dot_precision == "highest" else "tf32x3"
    name, backward = covariance.KERNEL_NAMES[products], covariance.BACKWARD_NAMES[products]
    monkeypatch.setitem(common.TUNING, name, {**common.TUNING[name], "block": block})
    monkeypatch.setitem(common.TUNING, backward, {**common.TUNING[backward], "checkpoints": checkpoints})
    _, k, _, _, log_decay, _ = _inputs()
    noise = RNG.uniform(0.0, 0.1, size=log_decay.shape)
    beta = RNG.uniform(0.5, 4.0, size=log_decay.shape)
    a = RNG.normal(size=(B, H, K, K))
    p0 = a @ np.swapaxes(a, -1, -2) / K + 0.5 * np.eye(K)
    # on a GPU the default products are TF32x3 (about float32's accuracy, not IEEE's): 2e-5 there
    tol = 2e-5 if (dot_precision == "default" and not INTERPRET) else 5e-6
    _check(lambda *x: covariance.covariance_pass(None, *x, chunk_size=32, dot_precision=dot_precision,
                                                 interpret=interpret)[:2],
           _kalman_covariance, (k, log_decay, noise, beta, p0), symmetric=(4,), tol=tol)


def test_covariance_pass_with_key_noise():
    """Process noise along the key (``Q_t = q_t k_t k_t^T``), some steps without any (``q_t = 0``): the
    kernels' gains, final covariance and every gradient against the float64 step-by-step recursion (the
    reference, the chunked form, is tested so in tests/test_key_noise.py)."""
    interpret = True
    _, k, _, _, log_decay, _ = _inputs()
    noise = RNG.uniform(0.0, 3.0, size=log_decay.shape) * (RNG.uniform(size=log_decay.shape) < 0.7)
    beta = RNG.uniform(0.5, 4.0, size=log_decay.shape)
    a = RNG.normal(size=(B, H, K, K))
    p0 = a @ np.swapaxes(a, -1, -2) / K + 0.5 * np.eye(K)
    _check(lambda *x: covariance.covariance_pass(None, *x, chunk_size=32, key_noise=True, dot_precision="highest",
                                                 interpret=interpret)[:2],
           lambda *x: _kalman_covariance(*x, key_noise=True), (k, log_decay, noise, beta, p0), symmetric=(4,))


@pytest.mark.parametrize("key_noise", [False, True], ids=["isotropic_noise", "key_noise"])
@pytest.mark.parametrize("one_loop", [True, False], ids=["one_loop", "two_loops"])
def test_covariance_block_backward_is_the_blocks_derivative(one_loop, key_noise):
    """`_block_backward` (the backward kernel's body, written by hand) equals JAX's reverse mode of
    `_block` (the forward kernel's body) on one block in float64, for every input and both factor forms,
    with decays and noise (isotropic or along the key) on: every term of the derivative is exercised."""
    dot = lambda a, b, contract=((1,), (0,)): jax.lax.dot_general(a, b, (contract, ((), ())),
                                                                  precision=jax.lax.Precision.HIGHEST)
    whitening = covariance.whitening_tile if one_loop else covariance._whitening_two_loops
    size, key_dim = 16, 8
    k = jnp.asarray(RNG.normal(size=(size, key_dim)) / np.sqrt(key_dim))
    log_decay, noise = jnp.asarray(-RNG.uniform(0.01, 0.3, size)), jnp.asarray(RNG.uniform(0.01, 0.5, size))
    inv_beta = jnp.asarray(RNG.uniform(0.2, 2.0, size))
    a = RNG.normal(size=(key_dim, key_dim))
    cov = jnp.asarray(a @ a.T / key_dim + 0.5 * np.eye(key_dim))

    def block(k_, ld, q, ib, p):
        blk = covariance._block(k_, ld, q, ib, p, 0.0, dot=dot, whitening=whitening, key_noise=key_noise)
        return blk["gains"], (covariance._next_covariance(blk, k_, p, dot=dot)
                              + blk["alpha_last"] * jnp.eye(key_dim))

    args = (k, log_decay, noise, inv_beta, cov)
    d_gains = jnp.asarray(RNG.normal(size=(size, key_dim)))
    d_next = RNG.normal(size=(key_dim, key_dim))
    d_next = jnp.asarray(d_next + d_next.T)
    want = jax.vjp(block, *args)[1]((d_gains, d_next))
    blk = covariance._block(*args[:4], cov, 0.0, dot=dot, whitening=whitening, key_noise=key_noise)
    got = covariance._block_backward(blk, k, noise, lambda: cov, d_gains, lambda: d_next, dot=dot)
    assert all(g.dtype == jnp.float64 for g in got)
    for i, (g, w) in enumerate(zip(got, want)):
        w = 0.5 * (w + w.T) if i == 4 else w
        assert _relative(g, w) < 1e-12


@pytest.mark.parametrize("dot_precision", ["default", "highest"])
@pytest.mark.parametrize("form", [dict(carry="memory", factor="two_loops"), dict(carry="registers", factor="one_loop"),
                                  dict(carry="memory", factor="one_loop")])
def test_covariance_kernel_forms(monkeypatch, form, dot_precision):
    """Every form of the covariance kernel (P carried in registers or through its output block; L^{-1} by
    one elimination or by Cholesky then substitution), with TF32x3 (default) or IEEE products, against the
    float64 covariance recursion. TF32 products run on a GPU only (the interpreter takes IEEE ones)."""
    name = covariance.KERNEL_NAMES["ieee" if dot_precision == "highest" else "tf32x3"]
    monkeypatch.setitem(common.TUNING, name, {**common.TUNING[name], **form})
    _, k, _, _, log_decay, _ = _inputs()
    noise = RNG.uniform(0.0, 0.1, size=log_decay.shape)
    beta = RNG.uniform(0.5, 4.0, size=log_decay.shape)
    a = RNG.normal(size=(B, H, K, K))
    p0 = a @ np.swapaxes(a, -1, -2) / K + 0.5 * np.eye(K)
    args = [jnp.asarray(x, jnp.float32) for x in (k, log_decay, noise, beta, p0)]
    gains, final, _ = covariance.covariance_pass(None, *args, chunk_size=16, dot_precision=dot_precision,
                                                 interpret=INTERPRET)
    want_gains, want_final = _kalman_covariance(*(jnp.asarray(x, jnp.float64) for x in (k, log_decay, noise, beta, p0)))
    tol = 2e-5 if (dot_precision == "default" and not INTERPRET) else 5e-6    # TF32x3 on a GPU
    assert _relative(gains, want_gains) < tol and _relative(final, want_final) < tol


def test_launch_settings_from_the_environment(monkeypatch):
    """MBD_PALLAS_TUNING merges into the launch settings; a malformed value, an unknown kernel or a
    setting the kernel does not read (a removed form's) is refused with what is accepted."""
    monkeypatch.setattr(common, "TUNING", {name: dict(v) for name, v in common.TUNING.items()})
    common.tuning_from_environment('{"covariance_pass": {"num_warps": 2}}')
    assert common.tuning("covariance_pass", "num_warps") == 2
    assert common.tuning("covariance_pass", "factor") == "two_loops"          # the others kept
    common.tuning_from_environment('{"covariance_pass": {"block": 32}, "gla_output": {"block_v": 64}}')
    assert common.tuning("covariance_pass", "block") == 32 and common.tuning("gla_output", "block_v") == 64
    for bad, phrase in [("{x", "accepted: JSON"), ('{"covariance": {}}', "unknown kernels ['covariance']"),
                        ("[1]", "not an object of objects"),
                        ('{"gla_backward": {"programs": "split"}}', "sets ['programs'] of 'gla_backward'"),
                        ('{"covariance_pass_backward": {"factor": "one_loop"}}', "accepted: ['carry', 'checkpoints'")]:
        with pytest.raises(ValueError, match=re.escape(phrase)):
            common.tuning_from_environment(bad)


def test_warps_by_key_width(monkeypatch):
    """``num_warps`` as ``{largest K: warps}`` (the covariance kernels': 4 at K <= 64, 8 above) picks the
    entry of the smallest bound at least K, the largest bound's above all; it reaches the compiled call
    (the CUDA lowering's ``num_warps``); a malformed one is refused, saying what is accepted."""
    by_width = {"64": 4, "128": 8}
    monkeypatch.setitem(common.TUNING, "covariance_pass", {**common.TUNING["covariance_pass"], "num_warps": by_width})
    assert [common.num_warps("covariance_pass", d) for d in (16, 64, 65, 128, 256)] == [4, 4, 8, 8, 8]
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    for key_dim, warps in ((64, 4), (128, 8)):
        shapes = (sd(1, 32, 2, key_dim), sd(1, 32, 2), sd(1, 32, 2), sd(1, 32, 2), sd(1, 2, key_dim, key_dim))
        text = jax.jit(lambda *a: covariance.covariance_kernel(*a)).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
        assert re.findall(r"num_warps = (\d+)", text) == [str(warps)], key_dim
    for bad in ({}, {"wide": 4}):
        monkeypatch.setitem(common.TUNING, "covariance_pass", {**common.TUNING["covariance_pass"], "num_warps": bad})
        with pytest.raises(ValueError, match=re.escape("accepted: a number of warps or {largest key dim: warps}")):
            common.num_warps("covariance_pass", 64)


def test_bf16_products_stay_within_bf16_error():
    """bf16 q, k, v: tensor-core products in bf16, states and factorizations float32; the readouts
    come back in bf16, the dtype a filter returns them in."""
    q, k, v, beta, log_decay, s0 = _inputs()
    low = lambda x: jnp.asarray(x, jnp.bfloat16)
    y, final = delta_rule.delta_rule(low(q), low(k), jnp.asarray(beta[..., None] * k, jnp.float32), low(v),
                                     jnp.asarray(log_decay, jnp.float32), jnp.asarray(s0, jnp.float32),
                                     chunk_size=16, interpret=INTERPRET)
    as64 = lambda x: jnp.asarray(np.asarray(low(x), np.float64))
    want_y, want_s = _recurrence(as64(q), as64(k), jnp.asarray(beta)[..., None] * as64(k), as64(v),
                                 jnp.asarray(log_decay), jnp.asarray(s0), erase=True)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32   # readouts in the values' dtype
    assert _relative(y, want_y) < 2e-2 and _relative(final, want_s) < 2e-2


def _triton_calls(fn, *shapes):
    lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    return lowered.as_text().count("xla.gpu.triton")


def test_kernels_lower_for_cuda():
    """Traced on this CPU and lowered for CUDA, the program holds the Triton kernels (forward and
    backward), chosen at lowering time (no reference left in their place)."""
    sd = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    f32 = jnp.float32
    b, t, h, d = 2, 192, 2, 64
    seq, gate, state = sd(b, t, h, d), sd(b, t, h, dtype=f32), sd(b, h, d, d, dtype=f32)

    def delta(q, k, w, v, ld, s):
        y, final = delta_rule.delta_rule(q, k, w, v, ld, s)
        return jnp.sum(y) + jnp.sum(final)

    assert _triton_calls(delta, seq, seq, sd(b, t, h, d, dtype=f32), seq, gate, state) == 3
    assert _triton_calls(jax.grad(delta, argnums=(0, 1, 2, 3, 4, 5)), seq, seq, sd(b, t, h, d, dtype=f32), seq,
                         gate, state) == 6

    def additive(q, k, v, ld, s):
        y, final = delta_rule.additive(q, k, v, ld, s)
        return jnp.sum(y) + jnp.sum(final)

    assert _triton_calls(jax.grad(additive, argnums=(0, 1, 2, 3, 4)), seq, seq, seq, gate, state) == 5
    assert _triton_calls(lambda k, ld, n, bt, p: covariance.covariance_pass(None, k, ld, n, bt, p)[:2],
                         seq, gate, gate, gate, state) == 1

    def covariance_loss(k, ld, n, bt, p):      # bf16 keys: the kernels' cotangents come back in k's dtype
        gains, final, _ = covariance.covariance_pass(None, k, ld, n, bt, p)
        return jnp.sum(gains) + jnp.sum(final)

    assert _triton_calls(jax.grad(covariance_loss, argnums=(0, 1, 2, 3, 4)), seq, gate, gate, gate, state) == 2


def test_channelwise_delta_rule_lowers_for_cuda():
    """KDA-style, traced on this CPU and lowered for CUDA: forward, L's attention kernel, the state pass
    and GLA's two output kernels (4 Triton calls); with the gradient also A's attention kernel, the state
    pass in reverse and GLA's chunk backward's three (9); no chunked reference left in their place."""
    sd = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    f32 = jnp.float32
    b, t, h, d = 2, 192, 2, 64
    seq, keys32, state = sd(b, t, h, d), sd(b, t, h, d, dtype=f32), sd(b, h, d, d, dtype=f32)

    def delta(q, k, w, v, ld, s):
        y, final = delta_rule.delta_rule(q, k, w, v, ld, s)
        return jnp.sum(y) + jnp.sum(final)

    assert _triton_calls(delta, seq, seq, keys32, seq, keys32, state) == 4
    assert _triton_calls(jax.grad(delta, argnums=(0, 1, 2, 3, 4, 5)), seq, seq, keys32, seq, keys32, state) == 9


def test_covariance_kernel_refuses_unknown_products_and_block_sizes(monkeypatch):
    args = [jnp.zeros((1, 16, 1, 16)), *([jnp.zeros((1, 16, 1))] * 3), jnp.eye(16)[None, None]]
    with pytest.raises(ValueError, match="products='tf32'.*accepted: 'tf32x3', 'ieee'"):
        covariance.covariance_kernel(*args, products="tf32", interpret=True)
    monkeypatch.setitem(common.TUNING, "covariance_pass", {**common.TUNING["covariance_pass"], "block": 64})
    with pytest.raises(ValueError, match="'block'.* = 64; accepted: 16 or 32"):
        covariance.covariance_kernel(*args, interpret=True)


@pytest.mark.parametrize("dot_precision", ["default", "highest"])
@pytest.mark.parametrize("form", [dict(carry="memory", factor="one_loop"), dict(carry="registers", factor="two_loops"),
                                  dict(carry="memory", factor="two_loops", block=32)])
def test_covariance_kernel_forms_lower_for_cuda(monkeypatch, form, dot_precision):
    """Each form lowered for CUDA on this CPU, forward and gradient: the gradient's program holds the
    forward kernel (storing its checkpoints) and the backward kernel, both named, no reference."""
    products = "ieee" if dot_precision == "highest" else "tf32x3"
    name, backward = covariance.KERNEL_NAMES[products], covariance.BACKWARD_NAMES[products]
    monkeypatch.setitem(common.TUNING, name, {**common.TUNING[name], **form})
    monkeypatch.setitem(common.TUNING, backward, {**common.TUNING[backward], "carry": form["carry"]})
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    call = lambda k, ld, n, bt, p: covariance.covariance_pass(None, k, ld, n, bt, p, dot_precision=dot_precision)[:2]
    shapes = (sd(2, 64, 2, 128), sd(2, 64, 2), sd(2, 64, 2), sd(2, 64, 2), sd(2, 2, 128, 128))
    lowered = jax.jit(call).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert lowered.count("xla.gpu.triton") == 1 and f'name = "{name}"' in lowered
    loss = lambda *a: sum(jnp.sum(x) for x in call(*a))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*shapes).lower(
        lowering_platforms=("cuda",)).as_text()
    assert lowered.count("xla.gpu.triton") == 2
    assert f'name = "{name}"' in lowered and f'name = "{backward}"' in lowered
    # no reference left: its Cholesky factors (cuSOLVER's potrf) and triangular solves
    assert "potrf" not in lowered and "stablehlo.triangular_solve" not in lowered


def test_covariance_kernels_with_key_noise_lower_for_cuda():
    """Key noise's kernels (the same kernels, with ``Rg``) lowered for CUDA on this CPU at K = 128, forward
    and gradient: the forward kernel storing the checkpoints and the backward kernel; no reference."""
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    shapes = (sd(2, 64, 2, 128), sd(2, 64, 2), sd(2, 64, 2), sd(2, 64, 2), sd(2, 2, 128, 128))
    call = lambda *a: covariance.covariance_pass(None, *a, key_noise=True)[:2]
    assert _triton_calls(call, *shapes) == 1
    loss = lambda *a: sum(jnp.sum(x) for x in call(*a))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*shapes).lower(
        lowering_platforms=("cuda",)).as_text()
    assert lowered.count("xla.gpu.triton") == 2 and 'name = "covariance_pass_backward"' in lowered
    assert "potrf" not in lowered and "stablehlo.triangular_solve" not in lowered


def test_covariance_checkpoints_kept_from_the_forward_pass_lower_for_cuda(monkeypatch):
    """With the checkpoints kept from the forward pass, the value-and-gradient program runs the forward
    kernel once (storing them) and the backward kernel, where the default runs it twice (the forward, then
    its rerun for the checkpoints); no reference. Off CUDA, the same gradients either way."""
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    shapes = (sd(2, 64, 2, 32), sd(2, 64, 2), sd(2, 64, 2), sd(2, 64, 2), sd(2, 2, 32, 32))
    # chunks of 16 for the reference (off CUDA): at the default 64 its gradient compiles for seconds
    loss = lambda *a: sum(jnp.sum(x) for x in covariance.covariance_pass(None, *a, chunk_size=16)[:2])
    for checkpoints, calls in (("rerun", 3), ("forward", 2)):
        monkeypatch.setitem(common.TUNING, "covariance_pass_backward",
                            {**common.TUNING["covariance_pass_backward"], "checkpoints": checkpoints})
        value_and_grad = jax.jit(lambda *a: jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*a))  # a new trace
        text = value_and_grad.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == calls and "potrf" not in text, checkpoints
    # off CUDA the reference runs either way (carrying zeros for the kept checkpoints): the same gradient
    _, k, _, _, log_decay, _ = _inputs()
    args = [jnp.asarray(x, jnp.float32) for x in (k, log_decay, np.full(log_decay.shape, 0.05),
                                                   np.full(log_decay.shape, 2.0),
                                                   np.broadcast_to(np.eye(K), (B, H, K, K)))]
    grads = {}
    for checkpoints in ("rerun", "forward"):
        monkeypatch.setitem(common.TUNING, "covariance_pass_backward",
                            {**common.TUNING["covariance_pass_backward"], "checkpoints": checkpoints})
        grads[checkpoints] = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3, 4)))(*args)
    for a, b in zip(grads["rerun"], grads["forward"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key_dim, value_dim, chunk", [(16, 16, 16), (32, 128, 32), (128, 64, 128), (128, 128, 64),
                                                     (256, 256, 64)])
def test_gla_kernels_lower_for_cuda(monkeypatch, key_dim, value_dim, chunk):
    """The channel-wise kernels lowered for CUDA on this CPU: forward (state pass, output), and with the
    gradient the backward kernels (state pass in reverse, the chunk backward as one kernel or three) and
    the state pass again, unless the chunk states are kept from the forward."""
    sd = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    b, t, h = 2, 200, 2
    args = (sd(b, t, h, key_dim), sd(b, t, h, key_dim), sd(b, t, h, value_dim),
            sd(b, t, h, key_dim, dtype=jnp.float32), sd(b, h, key_dim, value_dim, dtype=jnp.float32))

    def loss(q, k, v, ld, s):
        y, final = gla.additive(q, k, v, ld, s, chunk_size=chunk)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

    # a new function for each setting: jit caches a trace by the function it traces
    grad = lambda *a: jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a)
    assert _triton_calls(loss, *args) == 3                 # state pass, A, readout
    # the forward's three, the state pass again, the state backward, then dA, dv and dq / dk / db
    assert _triton_calls(grad, *args) == 8
    monkeypatch.setitem(common.TUNING, "gla_backward", dict(recompute_states=False))
    assert _triton_calls(lambda *a: grad(*a), *args) == 7


@pytest.mark.parametrize("diagonal", ["slices", "columns"])
def test_gla_output_forms(monkeypatch, diagonal):
    """Both forms of the channel-wise output (A's diagonal blocks over channel slices or column by
    column) in the interpreter against the float64 recurrence."""
    monkeypatch.setitem(common.TUNING, "gla_output", dict(diagonal=diagonal))
    q, k, v, _, log_decay, s0 = _inputs(channelwise=True)
    args = [jnp.asarray(x) for x in (q, k, v, log_decay, s0)]
    y, final = gla.additive(*(x.astype(jnp.float32) for x in args), chunk_size=32, precision="highest",
                            interpret=INTERPRET)
    want_y, want_final = _recurrence(*args[:2], *args[1:], erase=False, channelwise=True)
    assert _relative(y, want_y) < 5e-6 and _relative(final, want_final) < 5e-6


# ----------------------------------------------------------------------------------------------------
# The "pallas" lowering through `filters.compile`: every family, against the float64 sequential oracle.

import designmodels as dm  # noqa: E402
import filters  # noqa: E402
from filters.lowering import auto  # noqa: E402
from tests.support import random_inputs  # noqa: E402

PALLAS_MODELS = {
    "linear_attention": dm.linear_attention(), "mamba2": dm.mamba2(), "gla": dm.gla(),
    "deltanet": dm.deltanet(), "gated_deltanet": dm.gated_deltanet(), "longhorn": dm.longhorn(),
    "bayesian": dm.bayesian(process_noise=0.05), "bayesian_stationary": dm.bayesian(noise="stationary"),
    "bayesian_key_noise": dm.bayesian(process_noise="key"),
    "kda_style": dm.DesignModel(transition=dm.DiagonalDecay(None), observation=dm.KeyValueObservation(None),
                                covariance=dm.Reset(write_strength=True)),
}


@pytest.mark.parametrize("name", PALLAS_MODELS)
def test_pallas_lowering_equals_the_oracle(name):
    """Kernels in the interpreter, from an initial state, the last chunk padded; float32 inputs."""
    model = PALLAS_MODELS[name]
    q, k, v, gates = random_inputs(model, batch=1, time=21, heads=2, key_dim=16, value_dim=16, seed=3)
    state = filters.compile(model, backend="sequential")(q, k, v, **gates)[1]   # a nonzero start
    oracle = filters.compile(model, backend="sequential")
    ours = filters.compile(model, backend="pallas", chunk_size=16, precision="highest", interpret=INTERPRET)
    as32 = lambda x: jnp.asarray(x, jnp.float32)
    y, final = ours(as32(q), as32(k), as32(v), initial_state=jax.tree.map(as32, state),
                    **{n: as32(g) for n, g in gates.items()})
    want_y, want_final = oracle(q, k, v, initial_state=state, **gates)
    assert _relative(y, want_y) < 1e-5
    assert _relative(final.mean, want_final.mean) < 1e-5
    if want_final.covariance is not None:
        assert _relative(final.covariance, want_final.covariance) < 1e-5


def test_pallas_lowering_without_the_interpreter():
    """On a CPU the kernels' plain-JAX references run, on a GPU the kernels (float32 products here)."""
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=1, time=40, heads=2, key_dim=16, value_dim=16, seed=4,
                                   dtype=np.float32)
    y, _ = filters.compile(model, backend="pallas", chunk_size=16, precision="highest")(q, k, v, **gates)
    want, _ = filters.compile(model, backend="sequential")(q, k, v, **gates)
    assert _relative(y, want) < 1e-5


def test_float64_inputs_run_the_chunked_form():
    """The kernels compute in float32: float64 inputs keep float64 accuracy through the chunked form."""
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=1, time=20, heads=1, key_dim=8, value_dim=8, seed=5)
    y, _ = filters.compile(model, backend="pallas", chunk_size=16)(q, k, v, **gates)
    want, _ = filters.compile(model, backend="sequential")(q, k, v, **gates)
    assert y.dtype == jnp.float64 and _relative(y, want) < 1e-12


def test_the_filter_lowered_for_cuda_holds_the_kernels():
    """``filters.compile(model, backend="pallas")`` traced on a CPU and lowered for CUDA: the Triton
    kernels, forward and gradient (the choice is made at lowering, not from the default backend)."""
    model = dm.gated_deltanet()
    f = filters.compile(model, backend="pallas")
    sd = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    args = (sd(2, 128, 2, 64), sd(2, 128, 2, 64), sd(2, 128, 2, 64), sd(2, 128, 2, dtype=jnp.float32),
            sd(2, 128, 2, dtype=jnp.float32))

    def loss(q, k, v, log_decay, beta):
        return jnp.sum(f(q, k, v, log_decay=log_decay, beta=beta, validate=False)[0].astype(jnp.float32))

    assert _triton_calls(loss, *args) == 3
    assert _triton_calls(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args) == 6

    gla_filter = filters.compile(dm.gla(), backend="pallas")

    def gla_loss(q, k, v, log_decay):
        return jnp.sum(gla_filter(q, k, v, log_decay=log_decay, validate=False)[0].astype(jnp.float32))

    gla_args = args[:3] + (sd(2, 128, 2, 64, dtype=jnp.float32),)
    assert _triton_calls(gla_loss, *gla_args) == 3                                    # state, A, readout
    assert _triton_calls(jax.grad(gla_loss, argnums=(0, 1, 2, 3)), *gla_args) == 8    # + state, reverse, dA, dv, dq/dk/db

    bayesian_filter = filters.compile(dm.bayesian(), backend="pallas")

    def bayesian_loss(q, k, v, log_decay, beta):
        return jnp.sum(bayesian_filter(q, k, v, log_decay=log_decay, beta=beta, validate=False)[0].astype(jnp.float32))

    assert _triton_calls(bayesian_loss, *args) == 4      # the covariance pass, then the delta rule's three
    # the gradient: the covariance pass storing its checkpoints and its backward kernel, the delta rule's
    # six and its forward's prepare; no Cholesky factor of the reference's
    lowered = jax.jit(jax.grad(bayesian_loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert lowered.count("xla.gpu.triton") == 8 and 'name = "covariance_pass_backward"' in lowered
    assert "potrf" not in lowered and "stablehlo.triangular_solve" not in lowered


def test_auto_picks_the_kernels_on_a_gpu_where_they_were_measured_faster():
    for model in (dm.gated_deltanet(), dm.deltanet(), dm.mamba2(), dm.linear_attention(), dm.gla(),
                  dm.bayesian(), dm.bayesian(noise="stationary"), dm.bayesian(process_noise="key")):
        assert auto(filters.analyze(model), platform="gpu").name == "pallas"
    kda_style = dm.DesignModel(transition=dm.DiagonalDecay(None), observation=dm.KeyValueObservation(None),
                               covariance=dm.Reset(write_strength=True))
    assert auto(filters.analyze(kda_style), platform="gpu").name == "pallas"   # timed 2026-12-02: 2x chunked's speed
    assert auto(filters.analyze(dm.gated_deltanet()), platform="cpu").name == "chunked"
    assert "pallas" in filters.explain(dm.gated_deltanet())


@pytest.mark.parametrize("options, phrase", [
    (dict(chunk_size=48), "16, 32, 64 or 128"), (dict(precision="fast"), "'default'"),
    (dict(interpret="yes"), "interpret=")])
def test_pallas_options_are_checked(options, phrase):
    with pytest.raises(filters.BackendError, match=phrase):
        filters.compile(dm.gated_deltanet(), backend="pallas", **options)


def test_chunk_size_of_the_chunked_lowering_is_its_own():
    """An option two lowerings take is checked by the one that uses it."""
    assert filters.compile(dm.gated_deltanet(), backend="chunked", chunk_size=8).backend == "chunked"


@pytest.mark.parametrize("key_dim, value_dim", [(16, 32), (32, 16), (12, 16)])
def test_widths(key_dim, value_dim):
    """K != V in the kernels (value blocks); a width the kernels do not tile runs the chunked form."""
    model = dm.gated_deltanet()
    q, k, v, gates = random_inputs(model, batch=1, time=20, heads=1, key_dim=key_dim, value_dim=value_dim,
                                   seed=6, dtype=np.float32)
    y, final = filters.compile(model, backend="pallas", chunk_size=16, precision="highest", interpret=INTERPRET)(
        q, k, v, **gates)
    want_y, want_final = filters.compile(model, backend="sequential")(q, k, v, **gates)
    assert final.mean.shape == (1, 1, key_dim, value_dim)
    assert _relative(y, want_y) < 1e-5 and _relative(final.mean, want_final.mean) < 1e-5


def test_an_empty_batch_runs_without_a_kernel():
    """A batch of 0 sequences (or 0 steps) gives empty outputs and the state of 0 sequences: no kernel is
    launched on a grid of 0 programs."""
    import designmodels as dm
    import filters
    f = filters.compile(dm.gated_deltanet(), backend="pallas", interpret=INTERPRET)
    q = k = jnp.ones((0, 5, 2, 16)) / 4.0
    y, state = f(q, k, jnp.ones((0, 5, 2, 16)), log_decay=-jnp.ones((0, 5, 2)), beta=0.5 * jnp.ones((0, 5, 2)))
    assert y.shape == (0, 5, 2, 16) and state.mean.shape == (0, 2, 16, 16)
