"""Pallas GPU kernels of the chunked delta rule and of the additive (linear attention) recursion.

The generalized delta rule, with erase key ``k`` and write key ``w`` (reset family: ``w = eta k``; exact
family: ``w = Kg``, the Kalman gains) and a scalar decay ``a_t = exp(log_decay_t)``::

    S_t = a_t S_{t-1} + w_t u_t^T,   u_t = v_t - (a_t S_{t-1})^T k_t,   y_t = S_t^T q_t      S [K, V]

Inside a chunk of ``C`` steps (``b_i`` the log decay accumulated since the chunk start,
``gamma_i = exp(b_i)``), with ``L_ij = (k_i . w_j) exp(b_i - b_j)`` for ``j < i`` and
``T = (I + L)^{-1}`` (the UT transform)::

    W' = T (K * gamma),  U' = T V                          prepare    (parallel over chunks)
    U  = U' - W' S_c                                       state pass (sequential over chunks)
    S_{c+1} = gamma_C S_c + (W * exp(b_C - b))^T U
    Y  = (Q * gamma) S_c + [(q_i . w_j) exp(b_i - b_j)]_{j<=i} U          output (parallel)

The additive family (``S_t = a_t S_{t-1} + k_t v_t^T``) is the same state pass and output with
``U = V`` and ``w = k`` and no prepare.

Each stage is a Pallas kernel beside its plain-JAX reference of the same signature (``*_reference``);
the stages are differentiated separately (`jax.custom_vjp`): the state pass by a reverse kernel (the
only other sequential work), prepare and output by the reference's VJP, which is parallel over chunks.
The chunk states ``S_c`` (``h``) are stored in the product dtype (bf16 for bf16 inputs, as
flash-linear-attention stores them) and the triangular inverse is computed in float32 in the kernel:
forward substitution on 16 x 16 diagonal blocks, then block products.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from filters import linalg
from filters.pallas.common import (SUB, Dots, chunk_log_decay, exact_dot, from_chunks, iota2, launch,
                                   masked_exp, on_gpu, pad_time, rows, spec, to_chunks)

F32 = jnp.float32


def _value_block(value_dim: int, key_dim: int) -> int:
    """Columns of the state one program carries: ``K x BV`` float32 in registers."""
    return min(value_dim, 64 if key_dim <= 128 else 32)


# ----------------------------------------------------------------------------------------------------
# Prepare: W' = T (K * gamma), U' = T V.


def unit_lower_inverse_tile(strict):
    """``(I + N)^{-1}`` of a strictly lower ``N`` (a small square tile), by forward substitution:
    row ``i`` of ``X`` is ``e_i - sum_{j<i} N_ij X_j``."""
    size = strict.shape[0]
    r, c = iota2(size)

    def body(i, inverse):
        n_row = jnp.sum(jnp.where(r == i, strict, 0.0), axis=0)           # N[i, :], over j
        new = -jnp.sum(n_row[:, None] * inverse, axis=0)                   # -sum_j N_ij X[j, :]
        return jnp.where(r == i, new[None, :] + (c == i).astype(F32), inverse)

    return lax.fori_loop(1, size, body, (r == c).astype(F32))


def _prepare_kernel(k_ref, w_ref, v_ref, b_ref, wp_ref, up_ref, *, dots):
    chunk = k_ref.shape[0]
    n = chunk // SUB
    ks = [rows(k_ref, i * SUB, SUB) for i in range(n)]
    ws = [rows(w_ref, i * SUB, SUB) for i in range(n)]
    bs = [rows(b_ref, i * SUB, SUB) for i in range(n)]
    r, c = iota2(SUB)
    # L in 16 x 16 blocks (i >= j); every exponent b_i - b_j is <= 0.
    lower = {}
    for i in range(n):
        for j in range(i + 1):
            mask = (c < r) if i == j else (r >= 0)
            lower[i, j] = dots.nt(ks[i], ws[j]) * masked_exp(bs[i][:, None] - bs[j][None, :], mask)
    # T = (I + L)^{-1}: diagonal blocks by substitution, then T_ij = -T_ii sum_{j<=m<i} L_im T_mj.
    inv = {}
    for i in range(n):
        inv[i, i] = unit_lower_inverse_tile(lower[i, i])
        for j in range(i - 1, -1, -1):
            acc = exact_dot(lower[i, j], inv[j, j])
            for m in range(j + 1, i):
                acc = acc + exact_dot(lower[i, m], inv[m, j])
            inv[i, j] = -exact_dot(inv[i, i], acc)
    k_gamma = [ks[j].astype(F32) * jnp.exp(bs[j])[:, None] for j in range(n)]
    vs = [rows(v_ref, j * SUB, SUB) for j in range(n)]
    for i in range(n):
        wp = sum(dots(inv[i, j], k_gamma[j]) for j in range(i + 1))
        up = sum(dots(inv[i, j], vs[j]) for j in range(i + 1))
        wp_ref[pl.ds(i * SUB, SUB), :] = wp.astype(wp_ref.dtype)
        up_ref[pl.ds(i * SUB, SUB), :] = up.astype(up_ref.dtype)


def prepare_kernel(k, w, v, b, *, chunk, dots, interpret=False):
    """The prepare kernel: ``k, w [B,T,H,K]``, ``v [B,T,H,V]``, ``b [B,T,H]`` (T a multiple of
    ``chunk``) -> ``W' [B,T,H,K]``, ``U' [B,T,H,V]`` in the product dtype."""
    batch, time, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    grid = (batch, heads, time // chunk)
    block = lambda d: spec((None, chunk, None, d), lambda i, h, n: (i, n, h, 0))
    return launch(
        functools.partial(_prepare_kernel, dots=dots), grid=grid,
        in_specs=[block(key_dim), block(key_dim), block(value_dim),
                  spec((None, chunk, None), lambda i, h, n: (i, n, h))],
        out_specs=[block(key_dim), block(value_dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, dots.dtype), jax.ShapeDtypeStruct(v.shape, dots.dtype)],
        interpret=interpret, name="delta_rule_prepare")(k, w, v, b)


def prepare_reference(k, w, v, b, *, chunk, dots):
    """Plain JAX, same signature and result as `prepare_kernel`."""
    kc, wc, vc = (to_chunks(x.astype(F32), chunk) for x in (k, w, v))
    bc = to_chunks(b, chunk)
    strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
    lower = (kc @ jnp.swapaxes(wc, -1, -2)) * masked_exp(bc[..., :, None] - bc[..., None, :], strict)
    inverse = linalg.unit_lower_inverse(lower)
    wp = inverse @ (kc * jnp.exp(bc)[..., None])
    up = inverse @ vc
    return from_chunks(wp).astype(dots.dtype), from_chunks(up).astype(dots.dtype)


# ----------------------------------------------------------------------------------------------------
# The state pass: S_c for every chunk, the innovations U, the final state.


def _state_kernel(*refs, chunk, dots, erase):
    if erase:
        wp_ref, up_ref, w_ref, b_ref, s0_ref, h_ref, u_ref, sf_ref = refs
    else:
        up_ref, w_ref, b_ref, s0_ref, h_ref, sf_ref = refs
    key_dim = w_ref.shape[1]
    n = w_ref.shape[0] // chunk

    def body(c, state):
        t0 = pl.multiple_of(c * chunk, chunk)
        h_ref[pl.ds(pl.multiple_of(c * key_dim, key_dim), key_dim), :] = state.astype(h_ref.dtype)
        u = rows(up_ref, t0, chunk).astype(F32)
        if erase:
            u = u - dots(rows(wp_ref, t0, chunk), state)
            u_ref[pl.ds(t0, chunk), :] = u.astype(u_ref.dtype)
        b = rows(b_ref, t0, chunk)
        b_last = jnp.min(b)                                     # b is non-increasing: its last entry
        w_to_end = rows(w_ref, t0, chunk).astype(F32) * jnp.exp(b_last - b)[:, None]
        return jnp.exp(b_last) * state + dots.tn(w_to_end, u)

    sf_ref[...] = lax.fori_loop(0, n, body, s0_ref[...].astype(F32))


def state_kernel(wp, up, w, b, s0, *, chunk, dots, interpret=False):
    """The state pass. ``wp [B,T,H,K]`` (None: the additive recursion, ``U = U'``), ``up [B,T,H,V]``,
    ``w [B,T,H,K]``, ``b [B,T,H]``, ``s0 [B,H,K,V]`` -> ``h [B,H,N,K,V]`` (the state at every chunk
    start, product dtype), ``U [B,T,H,V]`` (None when additive), ``S_final [B,H,K,V]`` float32."""
    batch, time, heads, key_dim = w.shape
    value_dim = up.shape[-1]
    bv = _value_block(value_dim, key_dim)
    n = time // chunk
    erase = wp is not None
    grid = (batch, heads, value_dim // bv)
    seq = lambda d: spec((None, time, None, d), lambda i, h, j: (i, 0, h, 0))
    seq_v = spec((None, time, None, bv), lambda i, h, j: (i, 0, h, j))
    state = spec((None, None, key_dim, bv), lambda i, h, j: (i, h, 0, j))
    states = spec((None, None, n * key_dim, bv), lambda i, h, j: (i, h, 0, j))
    b_spec = spec((None, time, None), lambda i, h, j: (i, 0, h))
    in_specs = ([seq(key_dim)] if erase else []) + [seq_v, seq(key_dim), b_spec, state]
    out_specs = [states] + ([seq_v] if erase else []) + [state]
    out_shape = ([jax.ShapeDtypeStruct((batch, heads, n * key_dim, value_dim), dots.dtype)]
                 + ([jax.ShapeDtypeStruct(up.shape, dots.dtype)] if erase else [])
                 + [jax.ShapeDtypeStruct(s0.shape, F32)])
    args = ((wp,) if erase else ()) + (up, w, b, s0)
    out = launch(functools.partial(_state_kernel, chunk=chunk, dots=dots, erase=erase), grid=grid,
                 in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                 name="delta_rule_state" if erase else "additive_state")(*args)
    h = out[0].reshape(batch, heads, n, key_dim, value_dim)
    return (h, out[1], out[2]) if erase else (h, None, out[1])


def chunk_update(wp, up, w, b, state):
    """One chunk of the state pass, batched over chunks: ``(U, S_{c+1})`` from ``S_c``. Chunked layout:
    ``wp, w [..., C, K]`` (wp None: additive), ``up [..., C, V]``, ``b [..., C]``, ``state [..., K, V]``."""
    u = up if wp is None else up - wp @ state
    b_last = b[..., -1]
    w_to_end = w * jnp.exp(b_last[..., None] - b)[..., None]
    return u, jnp.exp(b_last)[..., None, None] * state + jnp.swapaxes(w_to_end, -1, -2) @ u


def state_reference(wp, up, w, b, s0, *, chunk, dots):
    """Plain JAX, same signature and result as `state_kernel` (a scan over chunks)."""
    erase = wp is not None
    xs = [to_chunks(x.astype(F32), chunk) for x in ((wp,) if erase else ()) + (up, w)]
    xs.append(to_chunks(b, chunk))
    xs = [jnp.moveaxis(x, 2, 0) for x in xs]                              # chunks first

    def body(state, x):
        wp_c = x[0] if erase else None
        up_c, w_c, b_c = x[-3:]
        u, new = chunk_update(wp_c, up_c, w_c, b_c, state)
        return new, (state.astype(dots.dtype), u.astype(dots.dtype))

    final, (h, u) = lax.scan(body, s0.astype(F32), xs)
    h = jnp.moveaxis(h, 0, 2)
    u = from_chunks(jnp.moveaxis(u, 0, 2)) if erase else None
    return h, u, final


def _state_backward_kernel(*refs, chunk, dots, erase):
    if erase:
        wp_ref, w_ref, b_ref, dh_ref, du_ref, dsf_ref, g_ref, ds0_ref = refs
    else:
        w_ref, b_ref, dh_ref, dsf_ref, g_ref, ds0_ref = refs
    key_dim = w_ref.shape[1]
    n = w_ref.shape[0] // chunk

    def body(i, grad):
        c = n - 1 - i
        t0 = pl.multiple_of(c * chunk, chunk)
        k0 = pl.multiple_of(c * key_dim, key_dim)
        g_ref[pl.ds(k0, key_dim), :] = grad
        b = rows(b_ref, t0, chunk)
        b_last = jnp.min(b)
        new = jnp.exp(b_last) * grad + dh_ref[pl.ds(k0, key_dim), :].astype(F32)
        if erase:
            w_to_end = rows(w_ref, t0, chunk).astype(F32) * jnp.exp(b_last - b)[:, None]
            du = rows(du_ref, t0, chunk).astype(F32) + dots(w_to_end, grad)
            new = new - dots.tn(rows(wp_ref, t0, chunk), du)
        return new

    ds0_ref[...] = lax.fori_loop(0, n, body, dsf_ref[...].astype(F32))


def state_backward_kernel(wp, w, b, dh, du, dsf, *, chunk, dots, interpret=False):
    """The state pass in reverse: the cotangent ``G_{c+1}`` of the state after every chunk
    ``[B,H,N,K,V]`` and of the initial state ``[B,H,K,V]``, from the cotangents of ``h`` (``dh``), of
    ``U`` (``du``, None when additive) and of the final state (``dsf``).

    ``G_c = gamma_C G_{c+1} + dh_c - W'^T (dU_c + (W * exp(b_C - b)) G_{c+1})``."""
    batch, time, heads, key_dim = w.shape
    value_dim = dsf.shape[-1]
    bv = _value_block(value_dim, key_dim)
    n = time // chunk
    erase = wp is not None
    grid = (batch, heads, value_dim // bv)
    seq = spec((None, time, None, key_dim), lambda i, h, j: (i, 0, h, 0))
    seq_v = spec((None, time, None, bv), lambda i, h, j: (i, 0, h, j))
    state = spec((None, None, key_dim, bv), lambda i, h, j: (i, h, 0, j))
    states = spec((None, None, n * key_dim, bv), lambda i, h, j: (i, h, 0, j))
    b_spec = spec((None, time, None), lambda i, h, j: (i, 0, h))
    dh = dh.reshape(batch, heads, n * key_dim, value_dim)
    in_specs = ([seq] if erase else []) + [seq, b_spec, states] + ([seq_v] if erase else []) + [state]
    args = ((wp,) if erase else ()) + (w, b, dh) + ((du,) if erase else ()) + (dsf,)
    g, ds0 = launch(
        functools.partial(_state_backward_kernel, chunk=chunk, dots=dots, erase=erase), grid=grid,
        in_specs=in_specs, out_specs=[states, state],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n * key_dim, value_dim), F32),
                   jax.ShapeDtypeStruct(dsf.shape, F32)],
        interpret=interpret, name="delta_rule_state_backward" if erase else "additive_state_backward")(*args)
    return g.reshape(batch, heads, n, key_dim, value_dim), ds0


def state_backward_reference(wp, w, b, dh, du, dsf, *, chunk, dots):
    """Plain JAX, same signature and result as `state_backward_kernel` (a reverse scan)."""
    erase = wp is not None
    xs = [to_chunks(x.astype(F32), chunk) for x in ((wp,) if erase else ()) + (w,)]
    xs += [to_chunks(b, chunk), dh.astype(F32)] + ([to_chunks(du.astype(F32), chunk)] if erase else [])
    xs = [jnp.moveaxis(x, 2, 0) for x in xs]

    def body(grad, x):
        if erase:
            wp_c, w_c, b_c, dh_c, du_c = x
        else:
            w_c, b_c, dh_c = x
        b_last = b_c[..., -1]
        new = jnp.exp(b_last)[..., None, None] * grad + dh_c
        if erase:
            w_to_end = w_c * jnp.exp(b_last[..., None] - b_c)[..., None]
            new = new - jnp.swapaxes(wp_c, -1, -2) @ (du_c + w_to_end @ grad)
        return new, grad

    ds0, g = lax.scan(body, dsf.astype(F32), xs, reverse=True)
    return jnp.moveaxis(g, 0, 2), ds0


# ----------------------------------------------------------------------------------------------------
# Output: Y = (Q * gamma) S_c + [(q_i . w_j) exp(b_i - b_j)]_{j<=i} U.


def _output_kernel(q_ref, w_ref, b_ref, h_ref, u_ref, y_ref, *, dots):
    q = q_ref[...]
    b = b_ref[...]
    r, c = iota2(q.shape[0])
    attend = dots.nt(q, w_ref[...]) * masked_exp(b[:, None] - b[None, :], c <= r)
    y = dots(q.astype(F32) * jnp.exp(b)[:, None], h_ref[...]) + dots(attend, u_ref[...])
    y_ref[...] = y.astype(y_ref.dtype)


def output_kernel(q, w, b, h, u, *, chunk, dots, interpret=False):
    """``q, w [B,T,H,K]``, ``b [B,T,H]``, ``h [B,H,N,K,V]``, ``u [B,T,H,V]`` -> ``y [B,T,H,V]`` float32."""
    batch, time, heads, key_dim = q.shape
    value_dim = u.shape[-1]
    n = time // chunk
    bv = min(value_dim, 128)
    grid = (batch, heads, n, value_dim // bv)
    block = spec((None, chunk, None, key_dim), lambda i, h, c, j: (i, c, h, 0))
    block_v = spec((None, chunk, None, bv), lambda i, h, c, j: (i, c, h, j))
    return launch(
        functools.partial(_output_kernel, dots=dots), grid=grid,
        in_specs=[block, block, spec((None, chunk, None), lambda i, h, c, j: (i, c, h)),
                  spec((None, None, key_dim, bv), lambda i, h, c, j: (i, h, c, j)), block_v],
        out_specs=block_v, out_shape=jax.ShapeDtypeStruct((batch, time, heads, value_dim), F32),
        interpret=interpret, name="delta_rule_output")(q, w, b, h.reshape(batch, heads, n * key_dim, value_dim), u)


def output_reference(q, w, b, h, u, *, chunk, dots):
    """Plain JAX, same signature and result as `output_kernel`."""
    qc, wc, uc = (to_chunks(x.astype(F32), chunk) for x in (q, w, u))
    bc = to_chunks(b, chunk)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    attend = (qc @ jnp.swapaxes(wc, -1, -2)) * masked_exp(bc[..., :, None] - bc[..., None, :], causal)
    y = (qc * jnp.exp(bc)[..., None]) @ h.astype(F32) + attend @ uc
    return from_chunks(y)


# ----------------------------------------------------------------------------------------------------
# The stages with their derivatives, and the two recursions.


@functools.lru_cache(maxsize=None)
def _stages(chunk: int, dots_key: tuple, interpret: bool):
    """The three stages for one configuration, each a `jax.custom_vjp` (cached: one per setting)."""
    dots = Dots(*dots_key)
    opts = dict(chunk=chunk, dots=dots)

    def parallel_stage(kernel, reference):
        run = on_gpu(functools.partial(kernel, **opts), functools.partial(reference, **opts), interpret)

        @jax.custom_vjp
        def stage(*args):
            return run(*args)

        def fwd(*args):
            return run(*args), args

        def bwd(args, cotangent):
            return jax.vjp(functools.partial(reference, **opts), *args)[1](cotangent)

        stage.defvjp(fwd, bwd)
        return stage

    prepare = parallel_stage(prepare_kernel, prepare_reference)
    output = parallel_stage(output_kernel, output_reference)

    def make_state_pass(erase):
        forward = on_gpu(functools.partial(state_kernel, **opts), functools.partial(state_reference, **opts),
                         interpret)
        backward = on_gpu(functools.partial(state_backward_kernel, **opts),
                          functools.partial(state_backward_reference, **opts), interpret)
        # Without erase, wp and U are None: the functions below take and return only arrays.
        if erase:
            run = lambda wp, up, w, b, s0: forward(wp, up, w, b, s0)
        else:
            run = lambda up, w, b, s0: forward(None, up, w, b, s0)

        @jax.custom_vjp
        def state_pass(*args):
            h, u, final = run(*args)
            return (h, u, final) if erase else (h, final)

        def fwd(*args):
            out = state_pass(*args)
            return out, (args, out[0])

        def bwd(residuals, cotangents):
            args, h = residuals
            if erase:
                wp, up, w, b, _ = args
                dh, du, dsf = cotangents
            else:
                (up, w, b, _), wp = args, None
                (dh, dsf), du = cotangents, None
            grads_next, ds0 = backward(wp, w, b, dh, du, dsf)
            # The parameters' cotangents: each chunk's update at its stored start state, pulled back
            # with (dU_c, G_{c+1}); the path through S_c is the reverse kernel's.
            chunks = lambda x: to_chunks(x.astype(F32), chunk)

            def update(*params):
                wp_, up_, w_, b_ = params if erase else (None, *params)
                return chunk_update(None if wp_ is None else chunks(wp_), chunks(up_), chunks(w_),
                                    to_chunks(b_, chunk), h.astype(F32))

            params = (wp, up, w, b) if erase else (up, w, b)
            _, pull = jax.vjp(update, *params)
            du_chunks = chunks(du) if erase else jnp.zeros(to_chunks(up, chunk).shape, F32)
            grads = pull((du_chunks, grads_next))
            grads = tuple(g.astype(p.dtype) for g, p in zip(grads, params))
            return grads + (ds0,)

        state_pass.defvjp(fwd, bwd)
        return state_pass

    return prepare, make_state_pass(True), make_state_pass(False), output


def _setup(q, v, log_decay, chunk):
    batch, time, heads, _ = q.shape
    padded = -(-time // chunk) * chunk
    b = chunk_log_decay(pad_time(log_decay, chunk), batch, padded, heads, chunk)
    return time, b


def delta_rule(q, k, w, v, log_decay, initial_state, *, chunk_size=64, precision="default",
               interpret=False):
    """``S_t = a_t S_{t-1} + w_t (v_t - (a_t S_{t-1})^T k_t)^T``, ``y_t = S_t^T q_t`` (module doc).

    Same signature and results as `filters.chunked.delta_rule`: ``q, k, w [B,T,H,K]``, ``v [B,T,H,V]``,
    ``log_decay`` None or ``[B,T,H]``, ``initial_state [B,H,K,V]``; returns ``y [B,T,H,V]`` float32 and
    the final state ``[B,H,K,V]`` float32.
    """
    prepare, state_pass, _, output = _stages(chunk_size, (jnp.dtype(v.dtype).name, precision), interpret)
    time, b = _setup(q, v, log_decay, chunk_size)
    q, k, w, v = (pad_time(x, chunk_size) for x in (q, k, w, v))
    wp, up = prepare(k, w, v, b)
    h, u, final = state_pass(wp, up, w, b, initial_state.astype(F32))
    y = output(q, w, b, h, u)
    return y[:, :time], final


def additive(q, k, v, log_decay, initial_state, *, chunk_size=64, precision="default", interpret=False):
    """``S_t = a_t S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t``, scalar or no decay. Same signature and
    results as `filters.chunked.additive` (``k`` already scaled by any input scale)."""
    _, _, state_pass, output = _stages(chunk_size, (jnp.dtype(v.dtype).name, precision), interpret)
    time, b = _setup(q, v, log_decay, chunk_size)
    q, k, v = (pad_time(x, chunk_size) for x in (q, k, v))
    h, final = state_pass(v, k, b, initial_state.astype(F32))
    y = output(q, k, b, h, v)
    return y[:, :time], final
