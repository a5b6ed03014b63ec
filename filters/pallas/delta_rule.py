"""Pallas GPU kernels of the chunked delta rule and of the scalar-decay additive recursion.

The generalized delta rule, with erase key ``k`` and write key ``w`` (reset family: ``w = eta k``; exact
family: ``w = Kg``, the Kalman gains) and a scalar decay ``a_t = exp(log_decay_t)``::

    S_t = a_t S_{t-1} + w_t u_t^T,   u_t = v_t - (a_t S_{t-1})^T k_t,   y_t = S_t^T q_t      S [K, V]

Inside a chunk of ``C`` steps, with ``b_i`` the log decay accumulated since the chunk start,
``gamma_i = exp(b_i)``, ``d_i = exp(b_C - b_i)``, ``D_ij = exp(b_i - b_j)`` (``j <= i``: every exponent
is <= 0), ``L = strict_lower((K W^T) * D)`` and ``T = (I + L)^{-1}`` (the UT transform)::

    W' = T (K * gamma),  U' = T V                               prepare    (parallel over chunks)
    U_c = U' - W' S_c,   S_{c+1} = gamma_C S_c + (W * d)^T U_c  state pass (sequential over chunks)
    Y   = (Q * gamma) S_c + A U_c,  A = lower((Q W^T) * D)      output     (parallel over chunks)

The additive family (``S_t = a_t S_{t-1} + k_t v_t^T``) is the same state pass and output with
``U = V``, ``W = K`` and no prepare.

The backward pass mirrors it, with cotangents written ``dX``::

    output:  dS_c = (Q * gamma)^T dY,  dU_c = A^T dY,  P = lower(dY U_c^T) * D,
             dQ = (dY S_c^T) * gamma + P W,  dW += P^T Q
    state (reverse):  G_N = dS_final,  dU_c += (W * d) G_{c+1},
             G_c = gamma_C G_{c+1} + dS_c - W'^T dU_c
    chunk:   dU' = dU_c,  dW' = -dU_c S_c^T,  dW += (U_c G_{c+1}^T) * d,
             dT = dW' (K * gamma)^T + dU' V^T,  dL = -strict_lower(T^T dT T^T),
             dK = (T^T dW') * gamma + (dL * D) W,  dW += (dL * D)^T K,  dV = T^T dU'

and the log decays collect ``db_i`` from every exponent (a matrix ``M = dA * A`` gives
``db_i += sum_j M_ij - sum_j M_ji``), then ``d log a_m = sum_{i >= m in its chunk} db_i``.

**A decay per key channel** (KDA-style, ``log_decay [B,T,H,K]``): ``b_i`` is a row ``[K]``, ``gamma_C``
scales the state's rows, ``W * d`` and ``K * gamma`` are scaled per channel, and ``L``, ``A`` take
``exp(b_ic - b_jc)`` inside the sum over channels. The state passes above take ``b [C, K]``; the output
``Y = (Q * gamma) S_c + A U_c`` and the update ``S_{c+1}`` are GLA's chunk with keys ``W`` and values
``U_c`` (`filters.pallas.gla`: its output kernel, and its chunk backward for ``dQ`` and the output's and
update's ``dW``, ``db``); ``L = strict_lower(pairwise(K, W))`` is GLA's attention kernel; the inverse
``T``, the products ``T (K * gamma)``, ``T V`` and the backward's per-chunk products ``(Q * gamma)^T dY``,
``A^T dY``, ``-dU S_c^T`` run in XLA, and the prepare's backward is the derivative of its plain-JAX form
(`_channel_prepare_reference`).

`delta_rule` and `additive` have the signatures of their plain-JAX references, `filters.chunked.delta_rule`
and `filters.chunked.additive`, which run on a platform without the kernels
(`filters.pallas.common.on_gpu`); the kernels are differentiated by the backward kernels above. Products take their operands in
the input dtype (bf16 on tensor cores) with float32 accumulation; the triangular inverse (forward
substitution on 16 x 16 diagonal blocks, then block products), the states and the cotangents of states
are float32. The chunk states ``S_c`` are kept for the backward pass in the product dtype, as
flash-linear-attention keeps them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from filters import chunked, linalg
from filters.pallas import gla
from filters.pallas.common import (SUB, Dots, chunk_log_decay, column_blocks, exact_dot, iota2, launch,
                                   masked_exp, on_gpu, pad_time, pltriton, rows, settings_key, spec, tuning,
                                   value_block)

F32 = jnp.float32


def _lower_terms(bs_i, bs_j, strict):
    """``D`` on a tile of rows ``i`` and columns ``j`` (zero above the diagonal, and on it if strict)."""
    r, c = iota2(bs_i.shape[0])
    return masked_exp(bs_i[:, None] - bs_j[None, :], (c < r) if strict else (c <= r))


def _exponent_cotangent(m):
    """``db`` from a matrix ``m = dX * X`` of terms ``exp(b_i - b_j)``: ``rowsum - colsum``."""
    return jnp.sum(m, axis=1) - jnp.sum(m, axis=0)


# ----------------------------------------------------------------------------------------------------
# Prepare: W' = T (K * gamma), U' = T V; T is kept for the backward pass.


def unit_lower_inverse_tile(strict):
    """``(I + N)^{-1}`` of a strictly lower ``N`` (a small square tile), by forward substitution:
    row ``i`` of ``X`` is ``e_i - sum_{j<i} N_ij X_j``."""
    size = strict.shape[0]
    r, c = iota2(size)

    def body(i, inverse):
        n_row = jnp.sum(jnp.where(r == i, strict, 0.0), axis=0)           # N[i, :], over j
        new = -jnp.sum(n_row[:, None] * inverse, axis=0)                   # -sum_j N_ij X[j, :]
        return jnp.where(r == i, new[None, :] + (c == i).astype(strict.dtype), inverse)

    return lax.fori_loop(1, size, body, (r == c).astype(strict.dtype))


def _prepare_kernel(k_ref, w_ref, v_ref, b_ref, wp_ref, up_ref, inv_ref, *, dots, reload, interpret):
    chunk = k_ref.shape[0]
    n = chunk // SUB
    barrier = (lambda: None) if interpret else pltriton.debug_barrier
    # Sub-blocks are loaded where they are used (cheap reloads from the cache) rather than held: the
    # kernel is bound by registers, not by loads.
    k_at = lambda i: rows(k_ref, i * SUB, SUB)
    b_at = lambda i: rows(b_ref, i * SUB, SUB)
    # L in 16 x 16 blocks (i >= j), each a product of 16-row tiles
    lower = {}
    for i in range(n):
        for j in range(i + 1):
            decay = (_lower_terms(b_at(i), b_at(j), True) if i == j
                     else jnp.exp(b_at(i)[:, None] - b_at(j)[None, :]))
            lower[i, j] = dots.nt(k_at(i), rows(w_ref, j * SUB, SUB)) * decay
    # T = (I + L)^{-1}: diagonal blocks by substitution, then T_ij = -T_ii sum_{j<=m<i} L_im T_mj.
    inv = {}
    for i in range(n):
        inv[i, i] = unit_lower_inverse_tile(lower[i, i])
        for j in range(i - 1, -1, -1):
            acc = exact_dot(lower[i, j], inv[j, j])
            for m in range(j + 1, i):
                acc = acc + exact_dot(lower[i, m], inv[m, j])
            inv[i, j] = -exact_dot(inv[i, i], acc)
    zero = jnp.zeros((SUB, SUB), F32)
    for i in range(n):
        for j in range(n):
            inv_ref[pl.ds(i * SUB, SUB), pl.ds(j * SUB, SUB)] = inv[i, j] if j <= i else zero
    if reload:
        # T is assembled through memory (the program's own stores, visible after the barrier), so that
        # W' and U' are two full-tile products instead of 2 n (n + 1) / 2 small ones.
        barrier()
        inverse = inv_ref[...]
        # T (K * gamma) = (T diag(gamma)) K: gamma scales the float32 T, K stays exact
        wp_ref[...] = dots(inverse * jnp.exp(b_ref[...])[None, :], k_ref[...]).astype(wp_ref.dtype)
        up_ref[...] = dots(inverse, v_ref[...]).astype(up_ref.dtype)
        return
    for i in range(n):
        block = pl.ds(i * SUB, SUB)
        wp = sum(dots(inv[i, j], k_at(j).astype(F32) * jnp.exp(b_at(j))[:, None]) for j in range(i + 1))
        wp_ref[block, :] = wp.astype(wp_ref.dtype)
        up = sum(dots(inv[i, j], rows(v_ref, j * SUB, SUB)) for j in range(i + 1))
        up_ref[block, :] = up.astype(up_ref.dtype)


def prepare_kernel(k, w, v, b, *, chunk, dots, interpret=False):
    """``k, w [B,T,H,K]``, ``v [B,T,H,V]``, ``b [B,T,H]`` (T a multiple of ``chunk``) -> ``W' [B,T,H,K]``,
    ``U' [B,T,H,V]`` in the product dtype and ``T [B,T,H,C]`` float32 (row ``i`` of each chunk's T)."""
    batch, time, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    block = lambda d: spec((None, chunk, None, d), lambda i, h, n: (i, n, h, 0))
    reload = bool(tuning("delta_rule_prepare", "reload"))
    return launch(
        functools.partial(_prepare_kernel, dots=dots, reload=reload, interpret=interpret),
        grid=(batch, heads, time // chunk),
        in_specs=[block(key_dim), block(key_dim), block(value_dim),
                  spec((None, chunk, None), lambda i, h, n: (i, n, h))],
        out_specs=[block(key_dim), block(value_dim), block(chunk)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, dots.dtype), jax.ShapeDtypeStruct(v.shape, dots.dtype),
                   jax.ShapeDtypeStruct((batch, time, heads, chunk), F32)],
        interpret=interpret, name="delta_rule_prepare")(k, w, v, b)


# ----------------------------------------------------------------------------------------------------
# The state pass: S_c for every chunk, the innovations U, the final state; and its reverse.


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
        if b.ndim == 2:                                          # channel-wise: b [C, K]
            b_last = jnp.min(b, axis=0)                          # per channel, non-increasing
            w_to_end = rows(w_ref, t0, chunk).astype(F32) * jnp.exp(b_last[None, :] - b)
            return jnp.exp(b_last)[:, None] * state + dots.tn(w_to_end, u)
        b_last = jnp.min(b)                                     # b is non-increasing: its last entry
        # (W * d)^T U = W^T (d * U): the decay scales the float32 innovations, W stays as stored
        return jnp.exp(b_last) * state + dots.tn(rows(w_ref, t0, chunk), u * jnp.exp(b_last - b)[:, None])

    sf_ref[...] = lax.fori_loop(0, n, body, s0_ref[...].astype(F32))


def _state_specs(time, key_dim, bv, n, channels=False):
    seq = lambda d, j=False: spec((None, time, None, d), (lambda i, h, v: (i, 0, h, v)) if j
                                  else (lambda i, h, v: (i, 0, h, 0)))
    return dict(seq_k=seq(key_dim), seq_v=seq(bv, True),
                state=spec((None, None, key_dim, bv), lambda i, h, v: (i, h, 0, v)),
                states=spec((None, None, n * key_dim, bv), lambda i, h, v: (i, h, 0, v)),
                b=seq(key_dim) if channels else spec((None, time, None), lambda i, h, v: (i, 0, h)))


def state_kernel(wp, up, w, b, s0, *, chunk, dots, interpret=False):
    """The state pass. ``wp [B,T,H,K]`` (None: additive, ``U = U'``), ``up [B,T,H,V]``, ``w [B,T,H,K]``,
    ``b [B,T,H]`` (or ``[B,T,H,K]``: a channel-wise decay), ``s0 [B,H,K,V]`` -> ``h [B,H,N,K,V]`` (the
    state at every chunk start, product dtype), ``U [B,T,H,V]`` (None when additive) and the final state
    ``[B,H,K,V]`` float32."""
    batch, time, heads, key_dim = w.shape
    value_dim = up.shape[-1]
    name = "delta_rule_state" if wp is not None else "additive_state"
    bv = value_block(name, value_dim, key_dim)
    n = time // chunk
    erase = wp is not None
    s = _state_specs(time, key_dim, bv, n, channels=b.ndim == 4)
    out = launch(
        functools.partial(_state_kernel, chunk=chunk, dots=dots, erase=erase),
        grid=(batch, heads, value_dim // bv),
        in_specs=([s["seq_k"]] if erase else []) + [s["seq_v"], s["seq_k"], s["b"], s["state"]],
        out_specs=[s["states"]] + ([s["seq_v"]] if erase else []) + [s["state"]],
        out_shape=([jax.ShapeDtypeStruct((batch, heads, n * key_dim, value_dim), dots.dtype)]
                   + ([jax.ShapeDtypeStruct(up.shape, dots.dtype)] if erase else [])
                   + [jax.ShapeDtypeStruct(s0.shape, F32)]),
        interpret=interpret, name=name)(*((wp,) if erase else ()), up, w, b, s0)
    h = out[0].reshape(batch, heads, n, key_dim, value_dim)
    return (h, out[1], out[2]) if erase else (h, None, out[1])


def _state_backward_kernel(*refs, chunk, dots, erase):
    if erase:
        wp_ref, w_ref, b_ref, dh_ref, du_ref, dsf_ref, g_ref, ubar_ref, ds0_ref = refs
    else:
        w_ref, b_ref, dh_ref, du_ref, dsf_ref, g_ref, ubar_ref, ds0_ref = refs
    key_dim = w_ref.shape[1]
    n = w_ref.shape[0] // chunk

    def body(i, grad):
        c = n - 1 - i
        t0 = pl.multiple_of(c * chunk, chunk)
        k0 = pl.multiple_of(c * key_dim, key_dim)
        g_ref[pl.ds(k0, key_dim), :] = grad.astype(g_ref.dtype)
        b = rows(b_ref, t0, chunk)
        if b.ndim == 2:                                          # channel-wise: b [C, K]
            b_last = jnp.min(b, axis=0)
            w_to_end = rows(w_ref, t0, chunk).astype(F32) * jnp.exp(b_last[None, :] - b)
            keep = jnp.exp(b_last)[:, None]
        else:
            b_last = jnp.min(b)
            w_to_end = rows(w_ref, t0, chunk).astype(F32) * jnp.exp(b_last - b)[:, None]
            keep = jnp.exp(b_last)
        ubar = rows(du_ref, t0, chunk).astype(F32) + dots(w_to_end, grad)
        ubar_ref[pl.ds(t0, chunk), :] = ubar.astype(ubar_ref.dtype)
        new = keep * grad + dh_ref[pl.ds(k0, key_dim), :].astype(F32)
        if erase:
            new = new - dots.tn(rows(wp_ref, t0, chunk), ubar)
        return new

    ds0_ref[...] = lax.fori_loop(0, n, body, dsf_ref[...].astype(F32))


def state_backward_kernel(wp, w, b, dh, du, dsf, *, chunk, dots, interpret=False):
    """The state pass in reverse. From the cotangents of ``h`` (``dh [B,H,N,K,V]``), of ``U`` (``du
    [B,T,H,V]``; of ``V`` when additive) and of the final state (``dsf``): the cotangent of the state
    after every chunk ``G_{c+1} [B,H,N,K,V]`` and the total cotangent of ``U`` ``[B,T,H,V]`` in the
    product dtype, and that of the initial state ``[B,H,K,V]`` float32."""
    batch, time, heads, key_dim = w.shape
    value_dim = dsf.shape[-1]
    erase = wp is not None
    name = "delta_rule_state_backward" if erase else "additive_state_backward"
    bv = value_block(name, value_dim, key_dim)
    n = time // chunk
    s = _state_specs(time, key_dim, bv, n, channels=b.ndim == 4)
    g, ubar, ds0 = launch(
        functools.partial(_state_backward_kernel, chunk=chunk, dots=dots, erase=erase),
        grid=(batch, heads, value_dim // bv),
        in_specs=([s["seq_k"]] if erase else []) + [s["seq_k"], s["b"], s["states"], s["seq_v"], s["state"]],
        out_specs=[s["states"], s["seq_v"], s["state"]],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n * key_dim, value_dim), dots.dtype),
                   jax.ShapeDtypeStruct(du.shape, dots.dtype), jax.ShapeDtypeStruct(dsf.shape, F32)],
        interpret=interpret, name=name)(
            *((wp,) if erase else ()), w, b, dh.reshape(batch, heads, n * key_dim, value_dim), du, dsf)
    return g.reshape(batch, heads, n, key_dim, value_dim), ubar, ds0


# ----------------------------------------------------------------------------------------------------
# Output: Y = (Q * gamma) S_c + A U_c, and its backward.


def _output_kernel(q_ref, w_ref, b_ref, h_ref, u_ref, y_ref, *, dots):
    q = q_ref[...]
    b = b_ref[...]
    attend = dots.nt(q, w_ref[...]) * _lower_terms(b, b, False)
    # (Q * gamma) S_c = diag(gamma) (Q S_c): the decay scales the float32 product, not the bf16 operand
    y = dots(q, h_ref[...]) * jnp.exp(b)[:, None] + dots(attend, u_ref[...])
    y_ref[...] = y.astype(y_ref.dtype)


def _output_specs(chunk, key_dim, value_dim, bv):
    block = spec((None, chunk, None, key_dim), lambda i, h, c, j: (i, c, h, 0))
    block_v = spec((None, chunk, None, bv), lambda i, h, c, j: (i, c, h, j))
    return dict(k=block, v=block_v, b=spec((None, chunk, None), lambda i, h, c, j: (i, c, h)),
                state=spec((None, None, key_dim, bv), lambda i, h, c, j: (i, h, c, j)))


def output_kernel(q, w, b, h, u, *, chunk, dots, interpret=False):
    """``q, w [B,T,H,K]``, ``b [B,T,H]``, ``h [B,H,N,K,V]``, ``u [B,T,H,V]`` -> ``y [B,T,H,V]`` in the
    dtype of ``u`` (the values' dtype: what the filter returns)."""
    batch, time, heads, key_dim = q.shape
    value_dim = u.shape[-1]
    n = time // chunk
    bv = min(value_dim, tuning("delta_rule_output", "block_v") or 128)
    s = _output_specs(chunk, key_dim, value_dim, bv)
    return launch(
        functools.partial(_output_kernel, dots=dots), grid=(batch, heads, n, value_dim // bv),
        in_specs=[s["k"], s["k"], s["b"], s["state"], s["v"]], out_specs=s["v"],
        out_shape=jax.ShapeDtypeStruct((batch, time, heads, value_dim), u.dtype),
        interpret=interpret, name="delta_rule_output")(
            q, w, b, h.reshape(batch, heads, n * key_dim, value_dim), u)


def _output_backward_kernel(q_ref, w_ref, b_ref, h_ref, u_ref, dy_ref,
                            dq_ref, dw_ref, db_ref, dh_ref, du_ref, *, dots, block_v):
    q, w, b = q_ref[...], w_ref[...], b_ref[...]
    gamma = jnp.exp(b)
    decay = _lower_terms(b, b, False)
    attend = dots.nt(q, w) * decay
    q_gamma = q.astype(F32) * gamma[:, None]
    dqh = jnp.zeros(q.shape, F32)
    dattend = jnp.zeros(attend.shape, F32)
    for cols in column_blocks(h_ref.shape[1], block_v):     # value blocks: contractions over V accumulate
        dy = dy_ref[:, cols]
        h = h_ref[:, cols]
        dh_ref[:, cols] = dots.tn(q_gamma, dy).astype(dh_ref.dtype)
        du_ref[:, cols] = dots.tn(attend, dy).astype(du_ref.dtype)
        dqh = dqh + dots.nt(dy, h)
        dattend = dattend + dots.nt(dy, u_ref[:, cols])
    p = dattend * decay
    dq_ref[...] = dqh * gamma[:, None] + dots(p, w)
    dw_ref[...] = dots.tn(p, q)
    db_ref[...] = jnp.sum(dqh * q_gamma, axis=1) + _exponent_cotangent(dattend * attend)


def output_backward_kernel(q, w, b, h, u, dy, *, chunk, dots, interpret=False):
    """The cotangents of `output_kernel`'s inputs from ``dy``: ``dq, dw [B,T,H,K]``, ``db [B,T,H]``
    float32, ``dh [B,H,N,K,V]``, ``du [B,T,H,V]`` in the product dtype (as the states are kept)."""
    batch, time, heads, key_dim = q.shape
    value_dim = u.shape[-1]
    n = time // chunk
    s = _output_specs(chunk, key_dim, value_dim, value_dim)
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, F32)
    low = lambda shape: jax.ShapeDtypeStruct(shape, dots.dtype)
    dq, dw, db, dh, du = launch(
        functools.partial(_output_backward_kernel, dots=dots, block_v=min(value_dim, 128)),
        grid=(batch, heads, n, 1),
        in_specs=[s["k"], s["k"], s["b"], s["state"], s["v"], s["v"]],
        out_specs=[s["k"], s["k"], s["b"], s["state"], s["v"]],
        out_shape=[f32(q.shape), f32(q.shape), f32(b.shape), low((batch, heads, n * key_dim, value_dim)),
                   low(u.shape)],
        interpret=interpret, name="delta_rule_output_backward")(
            q, w, b, h.reshape(batch, heads, n * key_dim, value_dim), u, dy)
    return dq, dw, db, dh.reshape(batch, heads, n, key_dim, value_dim), du


# ----------------------------------------------------------------------------------------------------
# Chunk backward: the state update's parameters and the prepare stage, per chunk.


def _chunk_backward_kernel(*refs, dots, erase, block_v):
    if erase:
        (k_ref, w_ref, v_ref, b_ref, inv_ref, h_ref, u_ref, ubar_ref, g_ref,
         dk_ref, dw_ref, dv_ref, db_ref) = refs
    else:
        w_ref, v_ref, b_ref, h_ref, g_ref, dw_ref, db_ref = refs
    b = b_ref[...]
    chunk, key_dim = w_ref.shape
    value_blocks = column_blocks(h_ref.shape[1], block_v)
    db = jnp.zeros((chunk,), F32)
    dw = jnp.zeros((chunk, key_dim), F32)
    if erase:
        # Prepare's inputs, from dW' = -dU S_c^T and dU' = dU (the order keeps few tiles alive).
        k, w = k_ref[...], w_ref[...]
        inv = inv_ref[...]
        gamma = jnp.exp(b)
        k_gamma = k.astype(F32) * gamma[:, None]
        dwp = -sum(dots.nt(ubar_ref[:, cols], h_ref[:, cols]) for cols in value_blocks)
        dkg = dots.f32(inv, dwp, ((0,), (0,)))                         # T^T dW'
        dtri = dots.nt(dwp, k_gamma)
        for cols in value_blocks:
            ubar = ubar_ref[:, cols]
            dtri = dtri + dots.nt(ubar, v_ref[:, cols])
            dv_ref[:, cols] = dots.f32(inv, ubar, ((0,), (0,)))
        dl = -dots.f32(dots.f32(inv, dtri, ((0,), (0,))), inv, ((1,), (1,)))      # -T^T dT T^T
        dgram = dl * _lower_terms(b, b, True)       # the cotangent of K W^T (strictly lower)
        dk_ref[...] = dkg * gamma[:, None] + dots(dgram, w)
        dw = dots.tn(dgram, k)
        db = jnp.sum(dkg * k_gamma, axis=1) + _exponent_cotangent(dgram * dots.nt(k, w))
    # The state update S_{c+1} = gamma_C S_c + (W * d)^T U_c, pulled back with G_{c+1}.
    u_ref_ = u_ref if erase else v_ref
    dwd = sum(dots.nt(u_ref_[:, cols], g_ref[:, cols]) for cols in value_blocks)   # of W * d
    d_end = sum(jnp.sum(g_ref[:, cols].astype(F32) * h_ref[:, cols].astype(F32)) for cols in value_blocks)
    b_last = jnp.min(b)
    d = jnp.exp(b_last - b)
    dd = jnp.sum(dwd * w_ref[...].astype(F32), axis=1) * d         # through d_j = exp(b_C - b_j)
    last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    dw_ref[...] = dw + dwd * d[:, None]
    db_ref[...] = db - dd + jnp.where(last, jnp.sum(dd) + d_end * jnp.exp(b_last), 0.0)


def chunk_backward_kernel(k, w, v, b, inv, h, u, ubar, g_next, *, chunk, dots, interpret=False):
    """Per chunk, the cotangents of the state update's and the prepare stage's inputs, from the state
    pass's reverse (``ubar``, the total cotangent of ``U``, and ``g_next`` = ``G_{c+1}``). With ``k``
    None (additive: ``U = V``, ``W = K``) returns ``(dw, db)``; else ``(dk, dw, dv, db)``, float32."""
    erase = k is not None
    batch, time, heads, key_dim = w.shape
    value_dim = v.shape[-1]
    n = time // chunk
    s = _output_specs(chunk, key_dim, value_dim, value_dim)
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, F32)
    h = h.reshape(batch, heads, n * key_dim, value_dim)
    g_next = g_next.reshape(batch, heads, n * key_dim, value_dim)
    if erase:
        in_specs = [s["k"], s["k"], s["v"], s["b"], spec((None, chunk, None, chunk), lambda i, hh, c, j: (i, c, hh, 0)),
                    s["state"], s["v"], s["v"], s["state"]]
        out_specs = [s["k"], s["k"], s["v"], s["b"]]
        out_shape = [f32(w.shape), f32(w.shape), f32(v.shape), f32(b.shape)]
        args = (k, w, v, b, inv, h, u, ubar, g_next)
    else:
        in_specs = [s["k"], s["v"], s["b"], s["state"], s["state"]]
        out_specs = [s["k"], s["b"]]
        out_shape = [f32(w.shape), f32(b.shape)]
        args = (w, v, b, h, g_next)
    return tuple(launch(
        functools.partial(_chunk_backward_kernel, dots=dots, erase=erase, block_v=min(value_dim, 128)),
        grid=(batch, heads, n, 1), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, name="delta_rule_chunk_backward" if erase else "additive_chunk_backward")(*args))


# ----------------------------------------------------------------------------------------------------
# The recursions: the kernels composed, differentiated by the backward kernels.


class _Stages:
    """The six kernels of one configuration."""

    def __init__(self, chunk: int, dots: Dots, interpret: bool = False):
        opts = dict(chunk=chunk, dots=dots, interpret=interpret)
        for name in ("prepare", "state", "output", "output_backward", "state_backward", "chunk_backward"):
            setattr(self, name, functools.partial(globals()[name + "_kernel"], **opts))


def _forward(stages, q, k, w, v, b, s0):
    """``(y, S_final)`` and the residuals of the backward pass. ``k`` None: additive (``W = K = w``)."""
    if k is not None:
        wp, up, inv = stages.prepare(k, w, v, b)
        h, u, final = stages.state(wp, up, w, b, s0)
    else:
        wp = inv = None
        h, _, final = stages.state(None, v, w, b, s0)
        u = v
    y = stages.output(q, w, b, h, u)
    return (y, final), (q, k, w, v, b, wp, inv, h, u)


def _backward(stages, residuals, cotangents):
    q, k, w, v, b, wp, inv, h, u = residuals
    dy, dsf = cotangents
    dq, dw, db, dh, du = stages.output_backward(q, w, b, h, u, dy)
    g_next, ubar, ds0 = stages.state_backward(wp, w, b, dh, du, dsf)
    if k is not None:
        dk, dw_chunk, dv, db_chunk = stages.chunk_backward(k, w, v, b, inv, h, u, ubar, g_next)
    else:
        dw_chunk, db_chunk = stages.chunk_backward(None, w, v, b, None, h, None, ubar, g_next)
        dk, dv = None, ubar
    return dq, dk, dw + dw_chunk, dv, db + db_chunk, ds0


@functools.lru_cache(maxsize=None)
def _kernels(erase: bool, chunk: int, dots_key: tuple, interpret: bool):
    """The kernels of one configuration as a `jax.custom_vjp` of ``(q, k, w, v, b, s0)`` (erase) or
    ``(q, k, v, b, s0)`` (additive), ``b`` the chunk's cumulative log decay, T a multiple of ``chunk``."""
    stages = _Stages(chunk, Dots(*dots_key), interpret)
    unpack = (lambda q, k, w, v, b, s0: (q, k, w, v, b, s0)) if erase else (
        lambda q, k, v, b, s0: (q, None, k, v, b, s0))

    @jax.custom_vjp
    def recursion(*args):
        return _forward(stages, *unpack(*args))[0]

    def fwd(*args):
        out, residuals = _forward(stages, *unpack(*args))
        return out, (args, residuals)

    def bwd(saved, cotangents):
        args, residuals = saved
        dq, dk, dw, dv, db, ds0 = _backward(stages, residuals, cotangents)
        grads = (dq, dk, dw, dv, db, ds0) if erase else (dq, dw, dv, db, ds0)
        return tuple(g.astype(a.dtype) for g, a in zip(grads, args))

    recursion.defvjp(fwd, bwd)
    return recursion


# ----------------------------------------------------------------------------------------------------
# The delta rule with a channel-wise decay (KDA-style): ``b [B,T,H,K]``. The sequential passes are the
# state kernels above (their decay per key channel), the output and the chunk backward are GLA's kernels
# with ``W`` for the keys and ``U`` for the values (``S_{c+1} = diag(exp(b_C)) S_c + (W * exp(b_C - b))^T
# U`` and ``Y = (Q * exp(b)) S_c + A U``, ``A = lower(pairwise(Q, W))``: GLA's chunk with those inputs),
# the UT transform's ``L = strict_lower(pairwise(K, W))`` is GLA's attention kernel; the inverse ``T``,
# the products ``T (K * exp(b))``, ``T V`` and the per-chunk products of the backward are XLA.


def _chunks(x, chunk):
    """``[B, T, H, D]`` -> ``[B, H, N, C, D]``."""
    batch, time, heads, dim = x.shape
    return x.reshape(batch, time // chunk, chunk, heads, dim).transpose(0, 3, 1, 2, 4)


def _unchunks(x):
    """``[B, H, N, C, D]`` -> ``[B, T, H, D]``."""
    batch, heads, n, chunk, dim = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(batch, n * chunk, heads, dim)


def _channel_products(inverse, k, v, b, chunk, dots):
    """``W' = T (K * exp(b))`` and ``U' = T V`` per chunk (``inverse [B,H,N,C,C]`` float32), in the product
    dtype."""
    product = lambda t, x: jnp.einsum("bhnij,bhnjd->bhnid", t, x, precision=dots.precision,
                                      preferred_element_type=F32)
    keys = _chunks(k.astype(F32) * jnp.exp(b), chunk)
    wp = product(inverse, keys)
    up = product(inverse, _chunks(v.astype(F32), chunk))
    return _unchunks(wp).astype(dots.dtype), _unchunks(up).astype(dots.dtype)


def _channel_prepare_reference(k, w, v, b, *, chunk, dots):
    """`_channel_prepare` in plain JAX (``L`` by `filters.chunked`'s pairwise product): its derivative is
    the prepare's backward."""
    pairwise = functools.partial(chunked._pairwise, strict=True)
    strict = pairwise(_chunks(k.astype(F32), chunk), _chunks(w.astype(F32), chunk), _chunks(b, chunk))
    return _channel_products(linalg.unit_lower_inverse(strict), k, v, b, chunk, dots)


def _channel_prepare(k, w, v, b, *, chunk, dots, interpret):
    """``W', U'`` with ``L`` from GLA's attention kernel (its diagonal, ``k_i . w_i``, removed)."""
    lower = _chunks(gla.attention_kernel(k, w, b, chunk=chunk, dots=dots, interpret=interpret), chunk)
    strict = jnp.tril(lower, -1)
    return _channel_products(linalg.unit_lower_inverse(strict), k, v, b, chunk, dots)


@functools.lru_cache(maxsize=None)
def _channel_kernels(chunk: int, dots_key: tuple, interpret: bool, settings: str):
    """The channel-wise delta rule as a `jax.custom_vjp` of ``(q, k, w, v, b, s0)``, ``b [B,T,H,K]`` the
    chunk's cumulative log decay, T a multiple of ``chunk`` (``settings``: `TUNING`, a cache key only, as
    in `gla._kernels`).

    Backward, in the module doc's symbols with ``D`` per channel: ``dS_c = (Q * exp(b))^T dY`` and ``dU_c =
    A^T dY`` per chunk; the state pass in reverse (`state_backward_kernel`: ``G_{c+1}``, the total ``dU``);
    GLA's chunk backward on ``(Q, W, U, b, S_c, G_{c+1}, dY)`` for ``dQ``, the ``dW`` and ``db`` of the
    output and the state update; then ``dU' = dU``, ``dW' = -dU S_c^T`` through the prepare's derivative."""
    dots = Dots(*dots_key)
    opts = dict(chunk=chunk, dots=dots, interpret=interpret)

    def forward(q, k, w, v, b, s0):
        wp, up = _channel_prepare(k, w, v, b, **opts)
        h, u, final = state_kernel(wp, up, w, b, s0, **opts)
        return (gla.output_kernel(q, w, b, h, u, **opts), final), (wp, h, u)

    @jax.custom_vjp
    def recursion(q, k, w, v, b, s0):
        return forward(q, k, w, v, b, s0)[0]

    def fwd(q, k, w, v, b, s0):
        out, (wp, h, u) = forward(q, k, w, v, b, s0)
        return out, ((q, k, w, v, b, s0), (wp, h, u))

    def bwd(saved, cotangents):
        (q, k, w, v, b, s0), (wp, h, u) = saved
        dy, dsf = cotangents
        attend_rows = gla.attention_kernel(q, w, b, **opts)                          # A [B,T,H,C]
        attend = _chunks(attend_rows, chunk)                                          # A [B,H,N,C,C]
        dy_c = _chunks(dy.astype(F32), chunk)
        dh = jnp.einsum("bhnck,bhncv->bhnkv", _chunks(q.astype(F32) * jnp.exp(b), chunk), dy_c,
                        precision=dots.precision)
        du = _unchunks(jnp.einsum("bhnij,bhniv->bhnjv", attend, dy_c, precision=dots.precision))
        g_next, ubar, ds0 = state_backward_kernel(wp, w, b, dh, du, dsf, **opts)
        dq, dw, _, db = gla.chunk_backward_kernel(q, w, u, b, h, g_next, dy, attend=attend_rows, **opts)
        dwp = -jnp.einsum("bhncv,bhnkv->bhnck", _chunks(ubar.astype(F32), chunk), h.astype(F32),
                          precision=dots.precision)
        _, prepare_vjp = jax.vjp(functools.partial(_channel_prepare_reference, chunk=chunk, dots=dots),
                                 k, w, v, b)
        dk, dw_prepare, dv, db_prepare = prepare_vjp((_unchunks(dwp).astype(dots.dtype), ubar))
        grads = (dq, dk, dw + dw_prepare, dv, db + db_prepare, ds0)
        return tuple(g.astype(a.dtype) for g, a in zip(grads, (q, k, w, v, b, s0)))

    recursion.defvjp(fwd, bwd)
    return recursion


def _on_gpu(erase, q, k, w, v, log_decay, initial_state, chunk_size, precision, interpret):
    """The kernels on CUDA (or in the interpreter), `filters.chunked`'s reference elsewhere; ``y`` in the
    values' dtype either way."""
    dots = Dots(v.dtype, precision)

    def kernels(q, k, w, v, log_decay, s0, interpret=False):
        batch, time, heads, _ = q.shape
        padded = -(-time // chunk_size) * chunk_size
        b = chunk_log_decay(pad_time(log_decay, chunk_size), batch, padded, heads, chunk_size)
        if b.ndim == 4:                                  # a channel-wise decay
            settings = settings_key()
            recursion = _channel_kernels(chunk_size, (jnp.dtype(v.dtype).name, precision), interpret, settings)
        else:
            recursion = _kernels(erase, chunk_size, (jnp.dtype(v.dtype).name, precision), interpret)
        if erase:
            # the write key enters only products: it travels in the product dtype, as k does
            args = (q, k, w.astype(dots.dtype), v)
        else:
            args = (q, k, v)
        y, final = recursion(*(pad_time(x, chunk_size) for x in args), b, s0.astype(F32))
        return y[:, :time].astype(v.dtype), final

    def reference(q, k, w, v, log_decay, s0):
        if erase:
            y, final = chunked.delta_rule(q, k, w, v, log_decay, s0, chunk_size=chunk_size)
        else:
            y, final = chunked.additive(q, k, v, log_decay, s0, chunk_size=chunk_size)
        return y.astype(v.dtype), final.astype(F32)

    if log_decay is None:       # no decay: the branches close over None (platform_dependent takes arrays)
        run = on_gpu(lambda q, k, w, v, s0, interpret=False: kernels(q, k, w, v, None, s0, interpret=interpret),
                     lambda q, k, w, v, s0: reference(q, k, w, v, None, s0), interpret)
        return run(q, k, w, v, initial_state)
    return on_gpu(kernels, reference, interpret)(q, k, w, v, log_decay, initial_state)


def delta_rule(q, k, w, v, log_decay, initial_state, *, chunk_size=64, precision="default",
               interpret=False):
    """``S_t = a_t S_{t-1} + w_t (v_t - (a_t S_{t-1})^T k_t)^T``, ``y_t = S_t^T q_t`` (module doc).

    Same signature and results as its plain-JAX reference `filters.chunked.delta_rule`, which runs off
    CUDA: ``q, k, w [B,T,H,K]``, ``v [B,T,H,V]``, ``log_decay`` None, ``[B,T,H]`` or ``[B,T,H,K]`` (a decay
    per key channel, KDA-style), ``initial_state
    [B,H,K,V]``; returns ``y [B,T,H,V]`` in the values' dtype and the final state ``[B,H,K,V]`` float32.
    """
    return _on_gpu(True, q, k, w, v, log_decay, initial_state, chunk_size, precision, interpret)


def additive(q, k, v, log_decay, initial_state, *, chunk_size=64, precision="default", interpret=False):
    """``S_t = a_t S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t``, scalar or no decay. Same signature and
    results as `filters.chunked.additive` (``k`` already scaled by any input scale)."""
    return _on_gpu(False, q, k, k, v, log_decay, initial_state, chunk_size, precision, interpret)
