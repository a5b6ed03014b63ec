"""Pallas GPU kernels of the additive recursion with a channel-wise decay (GLA), forward and backward.

``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t`` with ``a_t = exp(log_decay_t)`` per key
channel. In a chunk, with ``b_i`` the per-channel log decay accumulated since the chunk start (row ``i``
of ``b [C, K]``; ``b_C`` its last row) and ``S_c`` the state at the chunk start::

    S_{c+1} = diag(exp(b_C)) S_c + (K * exp(b_C - b))^T V                      state pass
    A_ij = sum_c q_ic k_jc exp(b_ic - b_jc)  (j <= i, else 0)                     attention
    Y = (Q * exp(b)) S_c + A V                                                    readout

``A`` has no matmul form over the whole chunk (the decay differs per channel), so it is built on 16-row
blocks, one program per row block: a block below the diagonal is a product of ``Q`` and ``K`` decayed
towards the first step ``r`` of the row block, ``(Q_i exp(b_i - b_r)) (K_j exp(b_r - b_j))^T`` (both
exponents <= 0), and a diagonal block is summed as ``[16, 16, 32]`` products over slices of the channels
(``TUNING["gla_output"]["diagonal"] = "slices"``, measured faster with these programs) or channel by
channel (``"columns"``). ``A`` goes through memory (its own kernel), so the readout is two full-tile
products.

The backward pass, with cotangents written ``dX`` and ``G_{c+1}`` the cotangent of ``S_{c+1}``::

    state (reverse):  G_N = dS_final,  G_c = diag(exp(b_C)) G_{c+1} + (Q * exp(b))^T dY,  dS_0 = G_0
    chunk:  dA = lower(dY V^T)
            dQ = (dY S_c^T) * exp(b) + [sum_{j<=i} dA_ij k_j exp(b_i - b_j)]_i
            dK = (V G_{c+1}^T) * exp(b_C - b) + [sum_{i>=j} dA_ij q_i exp(b_i - b_j)]_j
            dV = A^T dY + (K * exp(b_C - b)) G_{c+1}
            db = Q * dQ - K * dK,  and on the last row also exp(b_C) * rowsum(G_{c+1} * S_c)
                 + sum_j k_j * (V G_{c+1}^T)_j exp(b_C - b_j)

(every exponent is ``b_i - b_j`` or ``b_i`` alone: a query's side gains ``q * dq``, a key's side loses ``k
* dk``; ``b_C`` gathers the terms of the state update), and ``d log a_m = sum_{i >= m in its chunk}
db_i``, a reverse cumulative sum that JAX derives from `chunk_log_decay`. (The last row's terms are
``rowsum(G_{c+1} * S_{c+1})``: the derivative of ``S_{c+1}`` in ``b_C``.) The products with ``S_c`` and
``G_{c+1}`` are taken on 16 rows at a time, and the work is split in three kernels as
flash-linear-attention splits it: ``dA`` per chunk through memory; ``dV`` by full-tile products with
``A`` kept from the forward pass; then ``dq, dk, db`` by one program per 16-row block ``r`` (``dq`` of row
block ``r`` from ``dA``'s 16 x 16 tiles left of the diagonal, ``dk`` of column block ``r`` from those
below it), no program waiting on another and no V-wide tile alive in their loops. On an H200
(2026-12-02, 4x4096x16x128, each alone): 2.91 ms; one kernel of 16-row-block programs computing ``dA``
and ``dv`` in place as well 4.39 (register-bound: 255 registers, 12.5% occupancy), one program per chunk
7.46, the products with ``S_c`` and ``G_{c+1}`` by a separate full-tile kernel 4.87 (all three removed).
The chunk states are recomputed in the backward
pass by the state kernel rather than kept (``TUNING["gla_backward"]["recompute_states"]``), as
flash-linear-attention does: memory stays linear in T either way.

Products take their operands in the input dtype (bf16 on tensor cores) with float32 accumulation; the
decays, ``A``, the state and the cotangents are float32, the chunk states and ``G`` are stored in the
product dtype. `additive` has the signature of its plain-JAX reference `filters.chunked.additive`,
which runs on a platform without the kernels (`filters.pallas.common.on_gpu`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from filters import chunked
from filters.pallas.common import (SUB, TUNING, Dots, chunk_log_decay, column_blocks, iota2, launch,
                                   masked_exp, on_gpu, pad_time, rows, settings_key, spec, tuning, value_block)

F32 = jnp.float32


def _state_kernel(k_ref, v_ref, b_ref, s0_ref, h_ref, sf_ref, *, chunk, dots):
    key_dim = k_ref.shape[1]
    n = k_ref.shape[0] // chunk

    def body(c, state):
        t0 = pl.multiple_of(c * chunk, chunk)
        h_ref[pl.ds(pl.multiple_of(c * key_dim, key_dim), key_dim), :] = state.astype(h_ref.dtype)
        b = rows(b_ref, t0, chunk)
        b_last = jnp.min(b, axis=0)                              # per channel, non-increasing
        k_to_end = rows(k_ref, t0, chunk).astype(F32) * jnp.exp(b_last[None, :] - b)
        return jnp.exp(b_last)[:, None] * state + dots.tn(k_to_end, rows(v_ref, t0, chunk))

    sf_ref[...] = lax.fori_loop(0, n, body, s0_ref[...].astype(F32))


def _launch_state_pass(kernel, name, sequences, state, *, chunk, dots, interpret):
    """A pass over the chunks carrying ``K x BV`` float32 state blocks, one program per (batch, head, value
    block): ``sequences`` are ``(array, "keys" | "values")`` pairs, ``[B,T,H,K]`` read whole or ``[B,T,H,V]``
    read in the program's value block; ``state [B,H,K,V]`` the state it starts from. Returns the state of
    every chunk ``[B,H,N,K,V]`` (product dtype; the kernel writes them as ``[N K, BV]``) and the last
    ``[B,H,K,V]`` float32."""
    batch, heads, key_dim, value_dim = state.shape
    time = sequences[0][0].shape[1]
    bv = value_block(name, value_dim, key_dim)
    n = time // chunk
    index = {"keys": lambda i, h, j: (i, 0, h, 0), "values": lambda i, h, j: (i, 0, h, j)}
    width = {"keys": key_dim, "values": bv}
    block = spec((None, None, key_dim, bv), lambda i, h, j: (i, h, 0, j))
    every, last = launch(
        functools.partial(kernel, chunk=chunk, dots=dots), grid=(batch, heads, value_dim // bv),
        in_specs=[spec((None, time, None, width[kind]), index[kind]) for _, kind in sequences] + [block],
        out_specs=[spec((None, None, n * key_dim, bv), lambda i, h, j: (i, h, 0, j)), block],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n * key_dim, value_dim), dots.dtype),
                   jax.ShapeDtypeStruct(state.shape, F32)],
        interpret=interpret, name=name)(*(x for x, _ in sequences), state)
    return every.reshape(batch, heads, n, key_dim, value_dim), last


def state_kernel(k, v, b, s0, *, chunk, dots, interpret=False):
    """``k [B,T,H,K]``, ``v [B,T,H,V]``, ``b [B,T,H,K]``, ``s0 [B,H,K,V]`` -> ``h [B,H,N,K,V]`` (product
    dtype) and the final state (float32)."""
    return _launch_state_pass(_state_kernel, "gla_state", [(k, "keys"), (v, "values"), (b, "keys")], s0,
                              chunk=chunk, dots=dots, interpret=interpret)


def _diagonal_by_columns(q_ref, k_ref, b_ref, start, q, b):
    """The diagonal 16 x 16 block of ``A``, one column at a time (a loop of 16 reductions over K)."""
    r, c = iota2(SUB)
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)

    def column(col, diag):
        k_c = rows(k_ref, start + col, 1).astype(F32)
        b_c = rows(b_ref, start + col, 1)
        a = jnp.sum(q * k_c * masked_exp(b - b_c, row >= col), axis=1)
        return jnp.where(c == col, a[:, None], diag)

    return lax.fori_loop(0, SUB, column, jnp.zeros((SUB, SUB), F32))


def _diagonal_by_slices(q_ref, k_ref, b_ref, start, q, b, width=32):
    """The diagonal 16 x 16 block of ``A`` as ``[16, 16, width]`` products over slices of the channels."""
    r, c = iota2(SUB)
    lower = (c <= r)[:, :, None]
    diag = jnp.zeros((SUB, SUB), F32)
    width = min(width, k_ref.shape[1])
    for s in range(k_ref.shape[1] // width):
        cols = pl.ds(s * width, width)
        q_s = q_ref[pl.ds(start, SUB), cols].astype(F32)
        k_s = k_ref[pl.ds(start, SUB), cols].astype(F32)
        b_s = b_ref[pl.ds(start, SUB), cols]
        terms = q_s[:, None, :] * k_s[None, :, :] * masked_exp(b_s[:, None, :] - b_s[None, :, :], lower)
        diag = diag + jnp.sum(terms, axis=2)
    return diag


def _attention_row_block_kernel(q_ref, k_ref, b_ref, a_ref, *, dots, slices):
    """Row block ``i = program_id(3)`` of a chunk's ``A`` (``a_ref``: its 16 rows): the blocks left of
    the diagonal in a loop, ``(Q_i exp(b_i - r)) (K_j exp(r - b_j))^T`` with ``r`` the block's first
    step, then the diagonal, then zeros."""
    n = k_ref.shape[0] // SUB
    i = pl.program_id(3)
    start = pl.multiple_of(i * SUB, SUB)
    q = rows(q_ref, start, SUB).astype(F32)
    b = rows(b_ref, start, SUB)
    ref = rows(b_ref, start, 1)                                         # b at the block's first step
    q_rel = q * jnp.exp(b - ref)

    def left(j, carry):
        cols = pl.multiple_of(j * SUB, SUB)
        k_rel = rows(k_ref, cols, SUB).astype(F32) * jnp.exp(ref - rows(b_ref, cols, SUB))
        a_ref[:, pl.ds(cols, SUB)] = dots.nt(q_rel, k_rel)
        return carry

    def right(j, carry):
        a_ref[:, pl.ds(pl.multiple_of(j * SUB, SUB), SUB)] = jnp.zeros((SUB, SUB), F32)
        return carry

    lax.fori_loop(0, i, left, 0)
    diagonal = _diagonal_by_slices if slices else _diagonal_by_columns
    a_ref[:, pl.ds(start, SUB)] = diagonal(q_ref, k_ref, b_ref, start, q, b)
    lax.fori_loop(i + 1, n, right, 0)


def _readout_kernel(q_ref, b_ref, h_ref, a_ref, v_ref, y_ref, *, dots):
    """``Y = (Q * exp(b)) S_c + A V``: two full-tile products (``C`` rows each)."""
    y = dots(q_ref[...].astype(F32) * jnp.exp(b_ref[...]), h_ref[...]) + dots(a_ref[...], v_ref[...])
    y_ref[...] = y.astype(y_ref.dtype)


def _output_specs(chunk, key_dim, bv):
    return dict(k=spec((None, chunk, None, key_dim), lambda i, hh, c, j: (i, c, hh, 0)),
                v=spec((None, chunk, None, bv), lambda i, hh, c, j: (i, c, hh, j)),
                state=spec((None, None, key_dim, bv), lambda i, hh, c, j: (i, hh, c, j)),
                square=spec((None, chunk, None, chunk), lambda i, hh, c, j: (i, c, hh, 0)))


def attention_kernel(q, k, b, *, chunk, dots, interpret=False):
    """``q, k, b [B,T,H,K]`` -> ``A [B,T,H,C]`` float32 (row ``i`` of each chunk's ``A``, zero above the
    diagonal), computed once per chunk, whatever the value width, by one program per 16-row block of a
    chunk (as flash-linear-attention splits it; one program per chunk walking its blocks was 2x slower on
    an H200, 2026-12-02, and is gone)."""
    batch, time, heads, key_dim = q.shape
    s = _output_specs(chunk, key_dim, 1)
    slices = tuning("gla_output", "diagonal") != "columns"
    per_chunk = chunk // SUB
    return launch(
        functools.partial(_attention_row_block_kernel, dots=dots, slices=slices),
        grid=(batch, heads, time // chunk, per_chunk), in_specs=[s["k"]] * 3,
        out_specs=spec((None, SUB, None, chunk), lambda i, hh, c, r: (i, c * per_chunk + r, hh, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, time, heads, chunk), F32),
        interpret=interpret, name="gla_attention")(q, k, b)


def readout_kernel(q, b, h, attend, v, *, chunk, dots, interpret=False):
    """``q, b [B,T,H,K]``, ``h [B,H,N,K,V]``, ``attend [B,T,H,C]`` (`attention_kernel`'s), ``v
    [B,T,H,V]`` -> ``y [B,T,H,V]`` in the values' dtype."""
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n = time // chunk
    bv = min(value_dim, tuning("gla_output", "block_v") or 128)
    s = _output_specs(chunk, key_dim, bv)
    return launch(
        functools.partial(_readout_kernel, dots=dots), grid=(batch, heads, n, value_dim // bv),
        in_specs=[s["k"], s["k"], s["state"], s["square"], s["v"]], out_specs=s["v"],
        out_shape=jax.ShapeDtypeStruct((batch, time, heads, value_dim), v.dtype),
        interpret=interpret, name="gla_readout")(q, b, h.reshape(batch, heads, n * key_dim, value_dim), attend, v)


def output_kernel(q, k, b, h, v, *, chunk, dots, interpret=False):
    """``q, k, b [B,T,H,K]``, ``h [B,H,N,K,V]``, ``v [B,T,H,V]`` -> ``y [B,T,H,V]`` in the values' dtype
    (what the filter returns): ``A`` by its own kernel, through memory (``[C, C]`` float32 per chunk), so
    that the readout is two full-tile products, as flash-linear-attention's chunk_gla does. (``A`` kept
    in registers in one kernel of 16-row products was 1.7x slower on an H200, 2026-12-01, and is gone.)"""
    attend = attention_kernel(q, k, b, chunk=chunk, dots=dots, interpret=interpret)
    return readout_kernel(q, b, h, attend, v, chunk=chunk, dots=dots, interpret=interpret)


# ----------------------------------------------------------------------------------------------------
# Backward: the state pass in reverse, then one kernel per chunk for dq, dk, dv and db.


def _state_backward_kernel(q_ref, b_ref, dy_ref, dsf_ref, g_ref, ds0_ref, *, chunk, dots):
    key_dim = q_ref.shape[1]
    n = q_ref.shape[0] // chunk

    def body(i, grad):
        c = n - 1 - i
        t0 = pl.multiple_of(c * chunk, chunk)
        g_ref[pl.ds(pl.multiple_of(c * key_dim, key_dim), key_dim), :] = grad.astype(g_ref.dtype)
        b = rows(b_ref, t0, chunk)
        b_last = jnp.min(b, axis=0)                              # per channel, non-increasing
        q_gamma = rows(q_ref, t0, chunk).astype(F32) * jnp.exp(b)
        # G_c = diag(exp(b_C)) G_{c+1} + (Q * exp(b))^T dY: the output's cotangent of S_c computed here,
        # from q and dY, rather than stored by another kernel
        return jnp.exp(b_last)[:, None] * grad + dots.tn(q_gamma, rows(dy_ref, t0, chunk))

    ds0_ref[...] = lax.fori_loop(0, n, body, dsf_ref[...].astype(F32))


def state_backward_kernel(q, b, dy, dsf, *, chunk, dots, interpret=False):
    """The state pass in reverse: ``q, b [B,T,H,K]``, ``dy [B,T,H,V]``, ``dsf [B,H,K,V]`` (the cotangent
    of the final state) -> ``G [B,H,N,K,V]``, the cotangent of the state after every chunk (``G_{c+1}``
    for chunk ``c``; product dtype), and that of the initial state ``[B,H,K,V]`` float32."""
    return _launch_state_pass(_state_backward_kernel, "gla_state_backward",
                              [(q, "keys"), (b, "keys"), (dy, "values")], dsf, chunk=chunk, dots=dots,
                              interpret=interpret)


def _diagonal_backward(q_ref, k_ref, b_ref, start, dattend):
    """On the diagonal 16 x 16 block (steps ``start..start+15``), from ``dA`` (its cotangent, lower
    triangular entries used): the contributions ``dq_a = sum_{j<=a} dA_aj k_j exp(b_a - b_j)`` and ``dk_j
    = sum_{a>=j} dA_aj q_a exp(b_a - b_j)``, one step ``m`` of the block at a time (``dq``'s terms of key
    ``m``, ``dk``'s terms of query ``m``)."""
    r, c = iota2(SUB)
    row = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0)
    b = rows(b_ref, start, SUB)

    def step(m, carry):
        dq, dk = carry
        q_m = rows(q_ref, start + m, 1).astype(F32)
        k_m = rows(k_ref, start + m, 1).astype(F32)
        b_m = rows(b_ref, start + m, 1)
        to_m = masked_exp(b - b_m, row >= m)                         # exp(b_a - b_m), a >= m
        from_m = masked_exp(b_m - b, row <= m)                       # exp(b_m - b_j), j <= m
        column = jnp.sum(jnp.where(c == m, dattend, 0.0), axis=1)[:, None]   # dA[:, m]
        line = jnp.sum(jnp.where(r == m, dattend, 0.0), axis=0)[:, None]     # dA[m, :] as a column
        return dq + column * k_m * to_m, dk + line * q_m * from_m

    zero = jnp.zeros((SUB, k_ref.shape[1]), F32)
    return lax.fori_loop(0, SUB, step, (zero, zero))


def _state_update_end(k_ref, v_ref, b_ref, h_ref, g_ref, *, dots, value_blocks):
    """``db``'s terms of ``b_C`` on a chunk's last row, ``[1, K]``: the state update ``S_{c+1} =
    diag(exp(b_C)) S_c + (K * exp(b_C - b))^T V`` pulled back with ``G = G_{c+1}`` over the whole chunk,
    ``exp(b_C) rowsum(G * S_c) + sum_j k_j exp(b_C - b_j) (V G^T)_j`` (together ``rowsum(G * S_{c+1})``,
    the derivative of ``S_{c+1}`` in ``b_C``)."""
    b_end = rows(b_ref, k_ref.shape[0] - 1, 1)                      # b_C, [1, K]
    k_end = k_ref[...].astype(F32) * jnp.exp(b_end - b_ref[...])
    dk_state = sum(dots.nt(v_ref[:, cols], g_ref[:, cols]) for cols in value_blocks)
    g_h = sum(jnp.sum(g_ref[:, cols].astype(F32) * h_ref[:, cols].astype(F32), axis=1) for cols in value_blocks)
    return jnp.exp(b_end) * g_h[None, :] + jnp.sum(k_end * dk_state, axis=0)[None, :]


def _inter_chunk_rows(v_ref, dy_ref, b_ref, h_ref, g_ref, own, *, dots, value_blocks):
    """The products with ``S_c`` and ``G = G_{c+1}`` on the rows ``own`` of a chunk: ``(dq, dk) = ((dY
    S_c^T) * exp(b), (V G^T) * exp(b_C - b))``, the contractions over V in blocks of at most 128 columns
    (as the delta rule's backward does), so that no [K, V] tile larger than 128 x 128 is alive."""
    b = b_ref[own, :]
    b_end = rows(b_ref, v_ref.shape[0] - 1, 1)
    dq = sum(dots.nt(dy_ref[own, cols], h_ref[:, cols]) for cols in value_blocks) * jnp.exp(b)
    dk = sum(dots.nt(v_ref[own, cols], g_ref[:, cols]) for cols in value_blocks) * jnp.exp(b_end - b)
    return dq, dk


def _row_block_db(q_ref, k_ref, v_ref, b_ref, h_ref, g_ref, dq, dk, *, dots, value_blocks):
    """``db = q * dq - k * dk`` on the program's 16 rows; the chunk's last block also adds, on its last
    row, the derivative of ``S_{c+1}`` in ``b_C`` (`_state_update_end`)."""
    n = q_ref.shape[0] // SUB
    r = pl.program_id(3)
    start = pl.multiple_of(r * SUB, SUB)
    end = lax.cond(r == n - 1, lambda: _state_update_end(k_ref, v_ref, b_ref, h_ref, g_ref, dots=dots,
                                                         value_blocks=value_blocks),
                   lambda: jnp.zeros((1, k_ref.shape[1]), F32))
    last = lax.broadcasted_iota(jnp.int32, (SUB, 1), 0) == SUB - 1
    return (rows(q_ref, start, SUB).astype(F32) * dq - rows(k_ref, start, SUB).astype(F32) * dk
            + jnp.where(last, end, 0.0))


def _dattend_kernel(dy_ref, v_ref, da_ref, *, dots, block_v):
    """``dA = lower(dY V^T)`` of one chunk, ``[C, C]`` float32 (diagonal included), the contraction over
    V in blocks of at most 128 columns."""
    r, c = iota2(dy_ref.shape[0])
    da = sum(dots.nt(dy_ref[:, cols], v_ref[:, cols]) for cols in column_blocks(v_ref.shape[1], block_v))
    da_ref[...] = jnp.where(c <= r, da, 0.0)


def _dvalues_kernel(k_ref, b_ref, g_ref, a_ref, dy_ref, dv_ref, *, dots):
    """``dV = A^T dY + (K * exp(b_C - b)) G_{c+1}`` of one chunk and value block: two full-tile products."""
    b_end = rows(b_ref, k_ref.shape[0] - 1, 1)
    k_end = k_ref[...].astype(F32) * jnp.exp(b_end - b_ref[...])
    dv_ref[...] = dots.tn(a_ref[...], dy_ref[...]) + dots(k_end, g_ref[...])


def _dkeys_row_block_kernel(q_ref, k_ref, v_ref, b_ref, h_ref, g_ref, dy_ref, da_ref, dq_ref, dk_ref, db_ref, *,
                            dots, block_v):
    """``dq``, ``dk`` and ``db`` of the 16 steps of block ``r = program_id(3)`` of a chunk, with ``dA``
    read from memory (`_dattend_kernel`'s): the products with ``S_c`` and ``G_{c+1}`` on its rows, the
    diagonal block, ``dA``'s blocks left of it (``dq``) and below it (``dk``), each a 16 x 16 tile times a
    16 x K one; no V-wide tile is alive in the loops."""
    chunk = q_ref.shape[0]
    n = chunk // SUB
    r = pl.program_id(3)
    start = pl.multiple_of(r * SUB, SUB)
    value_blocks = column_blocks(v_ref.shape[1], block_v)
    own = pl.ds(start, SUB)
    b = rows(b_ref, start, SUB)
    dq, dk = _inter_chunk_rows(v_ref, dy_ref, b_ref, h_ref, g_ref, own, dots=dots, value_blocks=value_blocks)
    dq_diag, dk_diag = _diagonal_backward(q_ref, k_ref, b_ref, start, da_ref[own, pl.ds(start, SUB)])
    dq, dk = dq + dq_diag, dk + dk_diag
    ref = rows(b_ref, start, 1)

    def left(j, dq_rel):                          # dA_rj (K_j exp(ref - b_j)), then exp(b_r - ref)
        cols = pl.multiple_of(j * SUB, SUB)
        k_rel = rows(k_ref, cols, SUB).astype(F32) * jnp.exp(ref - rows(b_ref, cols, SUB))
        return dq_rel + dots(da_ref[own, pl.ds(cols, SUB)], k_rel)

    dq = dq + lax.fori_loop(0, r, left, jnp.zeros(dq.shape, F32)) * jnp.exp(b - ref)

    def below(i, dk):                             # dA_ir^T (Q_i exp(b_i - first_i)) exp(first_i - b_r)
        t = pl.multiple_of(i * SUB, SUB)
        first = rows(b_ref, t, 1)
        q_rel = rows(q_ref, t, SUB).astype(F32) * jnp.exp(rows(b_ref, t, SUB) - first)
        return dk + dots.tn(da_ref[pl.ds(t, SUB), pl.ds(start, SUB)], q_rel) * jnp.exp(first - b)

    dk = lax.fori_loop(r + 1, n, below, dk)
    dq_ref[...] = dq
    dk_ref[...] = dk
    db_ref[...] = _row_block_db(q_ref, k_ref, v_ref, b_ref, h_ref, g_ref, dq, dk, dots=dots,
                                value_blocks=value_blocks)


def chunk_backward_kernel(q, k, v, b, h, g, dy, *, chunk, dots, attend=None, interpret=False):
    """Per chunk, the cotangents of ``q, k [B,T,H,K]``, ``v [B,T,H,V]`` and the cumulative log decay
    ``b [B,T,H,K]`` (float32), from the chunk states ``h`` and their cotangents ``g`` (``[B,H,N,K,V]``,
    `state_backward_kernel`'s) and ``dy [B,T,H,V]``, in three kernels, as flash-linear-attention splits
    its GLA backward: ``dA`` per chunk through memory, ``dv`` by full-tile products with ``A``
    (``attend``, `attention_kernel`'s ``[B,T,H,C]``, kept from the forward pass; computed again when not
    given), then ``dq, dk, db`` by 16-row-block programs that hold no V-wide tile in their loops."""
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n = time // chunk
    per_chunk = chunk // SUB
    block_v = min(value_dim, 128)
    f32 = lambda x: jax.ShapeDtypeStruct(x.shape, F32)
    flat = lambda s: s.reshape(batch, heads, n * key_dim, value_dim)
    whole = lambda width: spec((None, chunk, None, width), lambda i, hh, c, r: (i, c, hh, 0))
    row = lambda width: spec((None, SUB, None, width), lambda i, hh, c, r: (i, c * per_chunk + r, hh, 0))
    state = spec((None, None, key_dim, value_dim), lambda i, hh, c, r: (i, hh, c, 0))
    if attend is None:
        attend = attention_kernel(q, k, b, chunk=chunk, dots=dots, interpret=interpret)
    per_chunk_spec = lambda width: spec((None, chunk, None, width), lambda i, hh, c: (i, c, hh, 0))
    dattend = launch(
        functools.partial(_dattend_kernel, dots=dots, block_v=block_v), grid=(batch, heads, n),
        in_specs=[per_chunk_spec(value_dim)] * 2, out_specs=per_chunk_spec(chunk),
        out_shape=jax.ShapeDtypeStruct((batch, time, heads, chunk), F32),
        interpret=interpret, name="gla_dattend")(dy, v)
    bv = min(value_dim, tuning("gla_dvalues", "block_v") or 128)
    s = _output_specs(chunk, key_dim, bv)
    dv = launch(
        functools.partial(_dvalues_kernel, dots=dots), grid=(batch, heads, n, value_dim // bv),
        in_specs=[s["k"], s["k"], s["state"], s["square"], s["v"]], out_specs=s["v"], out_shape=f32(v),
        interpret=interpret, name="gla_dvalues")(k, b, flat(g), attend, dy)
    dq, dk, db = launch(
        functools.partial(_dkeys_row_block_kernel, dots=dots, block_v=block_v),
        grid=(batch, heads, n, per_chunk),
        in_specs=[whole(key_dim), whole(key_dim), whole(value_dim), whole(key_dim), state, state,
                  whole(value_dim), whole(chunk)],
        out_specs=[row(key_dim), row(key_dim), row(key_dim)],
        out_shape=[f32(q), f32(k), f32(b)],
        interpret=interpret, name="gla_dkeys")(q, k, v, b, flat(h), flat(g), dy, dattend)
    return dq, dk, dv, db


# ----------------------------------------------------------------------------------------------------
# The recursion: the kernels composed, differentiated by the backward kernels.


@functools.lru_cache(maxsize=None)
def _kernels(chunk: int, dots_key: tuple, interpret: bool, settings: str):
    """The kernels of one configuration as a `jax.custom_vjp` of ``(q, k, v, b, s0)``, ``b`` the chunk's
    cumulative log decay ``[B,T,H,K]``, T a multiple of ``chunk``; the derivative of the cumulative sum
    (a reverse cumulative sum of ``db`` in each chunk) is left to JAX outside.

    With ``TUNING["gla_backward"]["recompute_states"]`` (the default, as flash-linear-attention does),
    the backward pass reruns the state pass instead of keeping the chunk states ``[B,H,N,K,V]`` from the
    forward: the residuals are the inputs and the forward's ``A`` (``[B,T,H,C]`` float32, ``T C`` floats
    per head, for the backward's ``dv``).

    ``settings`` is the kernels' `TUNING` when called: a key of the cache only, since JAX caches the
    traces of ``fwd`` and ``bwd`` (where the settings are read) by function."""
    recompute_states = bool(tuning("gla_backward", "recompute_states"))
    opts = dict(chunk=chunk, dots=Dots(*dots_key), interpret=interpret)

    def forward(q, k, v, b, s0):
        h, final = state_kernel(k, v, b, s0, **opts)
        attend = attention_kernel(q, k, b, **opts)
        return (readout_kernel(q, b, h, attend, v, **opts), final), (h, attend)

    @jax.custom_vjp
    def recursion(q, k, v, b, s0):
        return forward(q, k, v, b, s0)[0]

    def fwd(q, k, v, b, s0):
        out, (h, attend) = forward(q, k, v, b, s0)
        return out, ((q, k, v, b, s0), None if recompute_states else h, attend)

    def bwd(saved, cotangents):
        args, h, attend = saved
        q, k, v, b, s0 = args
        dy, dsf = cotangents
        if h is None:
            h, _ = state_kernel(k, v, b, s0, **opts)
        g, ds0 = state_backward_kernel(q, b, dy, dsf, **opts)
        dq, dk, dv, db = chunk_backward_kernel(q, k, v, b, h, g, dy, attend=attend, **opts)
        return tuple(d.astype(a.dtype) for d, a in zip((dq, dk, dv, db, ds0), args))

    recursion.defvjp(fwd, bwd)
    return recursion


def additive(q, k, v, log_decay, initial_state, *, chunk_size=64, precision="default", interpret=False):
    """``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t`` with ``log_decay [B,T,H,K]``. Same
    signature and results as its plain-JAX reference `filters.chunked.additive` (which runs off CUDA);
    ``y`` in the values' dtype, the final state float32. The kernels are differentiated by the backward
    kernels (module doc)."""
    if chunk_size % SUB:
        raise ValueError(f"chunk_size={chunk_size}: the channel-wise kernels need a multiple of {SUB}")
    dots_key = (jnp.dtype(v.dtype).name, precision)
    settings = settings_key([name for name in TUNING if name.startswith("gla")])

    def kernels(q, k, v, log_decay, s0, interpret=False):
        batch, time, heads, _ = q.shape
        padded = -(-time // chunk_size) * chunk_size
        b = chunk_log_decay(pad_time(log_decay, chunk_size), batch, padded, heads, chunk_size)
        recursion = _kernels(chunk_size, dots_key, interpret, settings)
        y, final = recursion(*(pad_time(x, chunk_size) for x in (q, k, v)), b, s0.astype(F32))
        return y[:, :time], final

    def reference(q, k, v, log_decay, s0):
        y, final = chunked.additive(q, k, v, log_decay, s0, chunk_size=chunk_size)
        return y.astype(v.dtype), final.astype(F32)

    return on_gpu(kernels, reference, interpret)(q, k, v, log_decay, initial_state)
