"""Pallas GPU kernels of the additive recursion with a channel-wise decay (GLA).

``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t`` with ``a_t = exp(log_decay_t)`` per key
channel. In a chunk, with ``b_i`` the per-channel log decay accumulated since the chunk start::

    S_{c+1} = diag(exp(b_C)) S_c + (K * exp(b_C - b))^T V                     state pass
    Y = (Q * exp(b)) S_c + A V,  A_ij = sum_c q_ic k_jc exp(b_ic - b_jc), j <= i   output

``A`` has no matmul form over the whole chunk (the decay differs per channel), so the output kernel
works on 16-row blocks: a block below the diagonal is a product of ``Q`` and ``K`` decayed towards
the first step ``r`` of the row block, ``(q_i exp(b_i - b_r)) . (k_j exp(b_r - b_j))`` (both exponents
<= 0), and a diagonal block is summed directly, as ``[16, 16, 32]`` products over slices of the
channels (or column by column: ``TUNING["gla_output"]["diagonal"] = "columns"``). The derivative is the
plain-JAX reference's, `filters.chunked.additive` (a backward kernel for the channel-wise decay does
not exist yet).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from filters import chunked
from filters.pallas.common import (SUB, Dots, chunk_log_decay, differentiated_by_reference, iota2, launch,
                                   masked_exp, pad_time, rows, spec, tuning)

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


def state_kernel(k, v, b, s0, *, chunk, dots, interpret=False):
    """``k [B,T,H,K]``, ``v [B,T,H,V]``, ``b [B,T,H,K]``, ``s0 [B,H,K,V]`` -> ``h [B,H,N,K,V]`` (product
    dtype) and the final state (float32)."""
    batch, time, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    bv = min(value_dim, tuning("gla_state", "block_v") or (64 if key_dim <= 128 else 32))
    n = time // chunk
    seq_k = spec((None, time, None, key_dim), lambda i, h, j: (i, 0, h, 0))
    state = spec((None, None, key_dim, bv), lambda i, h, j: (i, h, 0, j))
    h, final = launch(
        functools.partial(_state_kernel, chunk=chunk, dots=dots), grid=(batch, heads, value_dim // bv),
        in_specs=[seq_k, spec((None, time, None, bv), lambda i, h, j: (i, 0, h, j)), seq_k, state],
        out_specs=[spec((None, None, n * key_dim, bv), lambda i, h, j: (i, h, 0, j)), state],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, n * key_dim, value_dim), dots.dtype),
                   jax.ShapeDtypeStruct(s0.shape, F32)],
        interpret=interpret, name="gla_state")(k, v, b, s0)
    return h.reshape(batch, heads, n, key_dim, value_dim), final


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


def _output_kernel(q_ref, k_ref, b_ref, h_ref, v_ref, y_ref, *, dots, slices):
    chunk = q_ref.shape[0]
    h = h_ref[...]
    for i in range(chunk // SUB):
        q = rows(q_ref, i * SUB, SUB).astype(F32)
        b = rows(b_ref, i * SUB, SUB)
        acc = dots(q * jnp.exp(b), h)
        ref = rows(b_ref, i * SUB, 1)                                   # b at the block's first step
        q_rel = q * jnp.exp(b - ref)
        for j in range(i):
            k_rel = rows(k_ref, j * SUB, SUB).astype(F32) * jnp.exp(ref - rows(b_ref, j * SUB, SUB))
            acc = acc + dots(dots.nt(q_rel, k_rel), rows(v_ref, j * SUB, SUB))
        diagonal = _diagonal_by_slices if slices else _diagonal_by_columns
        acc = acc + dots(diagonal(q_ref, k_ref, b_ref, i * SUB, q, b), rows(v_ref, i * SUB, SUB))
        y_ref[pl.ds(i * SUB, SUB), :] = acc.astype(y_ref.dtype)


def output_kernel(q, k, b, h, v, *, chunk, dots, interpret=False):
    """``q, k, b [B,T,H,K]``, ``h [B,H,N,K,V]``, ``v [B,T,H,V]`` -> ``y [B,T,H,V]`` float32."""
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n = time // chunk
    bv = min(value_dim, tuning("gla_output", "block_v") or 128)
    block = spec((None, chunk, None, key_dim), lambda i, hh, c, j: (i, c, hh, 0))
    block_v = spec((None, chunk, None, bv), lambda i, hh, c, j: (i, c, hh, j))
    slices = tuning("gla_output", "diagonal") != "columns"
    return launch(
        functools.partial(_output_kernel, dots=dots, slices=slices), grid=(batch, heads, n, value_dim // bv),
        in_specs=[block, block, block, spec((None, None, key_dim, bv), lambda i, hh, c, j: (i, hh, c, j)), block_v],
        out_specs=block_v, out_shape=jax.ShapeDtypeStruct((batch, time, heads, value_dim), F32),
        interpret=interpret, name="gla_output")(q, k, b, h.reshape(batch, heads, n * key_dim, value_dim), v)


def _kernel_path(q, k, v, log_decay, s0, *, chunk, dots, interpret=False):
    batch, time, heads, _ = q.shape
    padded = -(-time // chunk) * chunk
    b = chunk_log_decay(pad_time(log_decay, chunk), batch, padded, heads, chunk)
    q, k, v = (pad_time(x, chunk) for x in (q, k, v))
    h, final = state_kernel(k, v, b, s0, chunk=chunk, dots=dots, interpret=interpret)
    y = output_kernel(q, k, b, h, v, chunk=chunk, dots=dots, interpret=interpret)
    return y[:, :time], final


@functools.lru_cache(maxsize=None)
def _recursion(chunk: int, dots_key: tuple, interpret: bool):
    """A `jax.custom_vjp` of ``(q, k, v, log_decay, s0)``: the kernels on CUDA (or in the interpreter),
    the chunked reference elsewhere; the derivative is the reference's."""
    def reference(q, k, v, log_decay, s0):
        y, final = chunked.additive(q, k, v, log_decay, s0, chunk_size=chunk)
        return y.astype(F32), final.astype(F32)

    return differentiated_by_reference(functools.partial(_kernel_path, chunk=chunk, dots=Dots(*dots_key)),
                                       reference, interpret)


def additive(q, k, v, log_decay, initial_state, *, chunk_size=64, precision="default", interpret=False):
    """``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t`` with ``log_decay [B,T,H,K]``. Same
    signature and results as its plain-JAX reference `filters.chunked.additive` (which runs off CUDA and
    gives the derivative); ``y`` in the values' dtype."""
    if chunk_size % SUB:
        raise ValueError(f"chunk_size={chunk_size}: the channel-wise kernels need a multiple of {SUB}")
    recursion = _recursion(chunk_size, (jnp.dtype(v.dtype).name, precision), interpret)
    y, final = recursion(q, k, v, log_decay.astype(F32), initial_state.astype(F32))
    return y.astype(v.dtype), final
