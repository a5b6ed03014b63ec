"""The Pallas GPU kernel of the exact family's covariance pass (the Bayesian Layer).

With a scalar (or no) decay and isotropic noise ``Q_t = q_t I`` the covariance recursion never sees the
values, so it runs first and hands the gains ``Kg_t`` to the delta-rule kernels (erase key ``k``, write
key ``Kg``). One program carries one head's ``P [K, K]`` (float32, in registers) through the sequence in
blocks of 16 steps. For a block starting from ``P_c`` (``b_i`` the log decay accumulated in the block,
``gamma_i = exp(b_i)``, ``R_ij = exp(b_i - b_j)`` for ``j <= i``, ``alpha_i = sum_{m<=i} q_m R_im^2``
the noise accumulated since the block start)::

    Sigma = (K gamma) P_c (K gamma)^T + (exp(-|b_i - b_j|) alpha_min(i,j)) * (K K^T) + diag(1 / beta)
    Sigma = L L^T,  X = L^{-1}                         (the block's observations one by one)
    Kg_i  = [gamma_i (X K gamma P_c)_i + sum_m X_im R_im alpha_m k_m] / L_ii
    Z     = gamma_C X (K gamma) P_c + X (K * R_C. alpha)
    P_C   = gamma_C^2 P_c + alpha_C I - Z^T Z

(the derivation is the chunked lowering's, `filters.chunked`). The 16 x 16 Cholesky factor and its
inverse are computed in the kernel (column by column, then forward substitution); every product is an
IEEE float32 product: this recursion is where precision is spent.

The derivative is the plain-JAX reference's, `filters.chunked.covariance_pass` (its scan over chunks,
with the implicit derivatives of the Cholesky factor): a backward kernel for this pass does not exist
yet.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from filters import chunked
from filters.pallas.common import (SUB, differentiated_by_reference, exact_dot, iota2, launch, masked_exp,
                                   pad_time, rows, spec)
from filters.pallas.delta_rule import unit_lower_inverse_tile

F32 = jnp.float32


def cholesky_tile(matrix):
    """``L`` with ``L L^T = A`` for a small symmetric positive definite tile, column by column:
    ``l_j = A_{:, j} / sqrt(A_jj)`` (rows >= j), then ``A -= l_j l_j^T``."""
    size = matrix.shape[0]
    r, c = iota2(size)
    index = lax.broadcasted_iota(jnp.int32, (size,), 0)

    def body(j, carry):
        rest, factor = carry
        column = jnp.sum(jnp.where(c == j, rest, 0.0), axis=1)
        pivot = jnp.sqrt(jnp.sum(jnp.where(index == j, column, 0.0)))
        column = jnp.where(index >= j, column / pivot, 0.0)
        factor = jnp.where(c == j, column[:, None], factor)
        return rest - column[:, None] * column[None, :], factor

    _, factor = lax.fori_loop(0, size, body, (matrix, jnp.zeros_like(matrix)))
    return factor


def block_terms(log_decay, noise):
    """The block's decay and noise terms: ``b, gamma, R (lower), alpha``. Shapes ``[C]`` / ``[C, C]``."""
    b = jnp.cumsum(log_decay)
    r, c = iota2(b.shape[0])
    decay = masked_exp(b[:, None] - b[None, :], c <= r)
    alpha = jnp.sum(decay * decay * noise[None, :], axis=1)
    return b, jnp.exp(b), decay, alpha


def _covariance_kernel(k_ref, ld_ref, noise_ref, inv_beta_ref, p0_ref, gains_ref, pf_ref, scale_ref):
    n = k_ref.shape[0] // SUB
    r, c = iota2(SUB)
    last = lax.broadcasted_iota(jnp.int32, (SUB,), 0) == SUB - 1

    # The carry is (P', s) with P = P' + s I: the noise enters as the scalar s, so that no K x K identity
    # occupies registers (the kernel is bound by registers: P alone is K^2 / threads of them).
    def body(i, carry):
        cov, scale = carry
        t0 = pl.multiple_of(i * SUB, SUB)
        k = rows(k_ref, t0, SUB).astype(F32)
        b, gamma, decay, alpha = block_terms(rows(ld_ref, t0, SUB), rows(noise_ref, t0, SUB))
        k_gamma = k * gamma[:, None]
        kg_p = exact_dot(k_gamma, cov) + scale * k_gamma                          # (K gamma) P_c
        alpha_min = jnp.where(c <= r, alpha[None, :], alpha[:, None])
        sigma = (exact_dot(kg_p, k_gamma, ((1,), (1,)))
                 + jnp.exp(-jnp.abs(b[:, None] - b[None, :])) * alpha_min * exact_dot(k, k, ((1,), (1,)))
                 + jnp.where(r == c, rows(inv_beta_ref, t0, SUB)[:, None], 0.0))
        sigma = 0.5 * (sigma + sigma.T)
        factor = cholesky_tile(sigma)
        pivots = jnp.sum(jnp.where(r == c, factor, 0.0), axis=1)
        unit = factor / pivots[:, None]
        whiten = unit_lower_inverse_tile(jnp.where(c < r, unit, 0.0)) / pivots[None, :]   # X = L^{-1}
        kt_p = exact_dot(whiten, kg_p)
        gains = (gamma[:, None] * kt_p + exact_dot(whiten * decay, k * alpha[:, None])) / pivots[:, None]
        gains_ref[pl.ds(t0, SUB), :] = gains
        b_last = jnp.min(b)
        alpha_last = jnp.sum(jnp.where(last, alpha, 0.0))
        z = jnp.exp(b_last) * kt_p + exact_dot(whiten, k * (jnp.exp(b_last - b) * alpha)[:, None])
        end = jnp.exp(2.0 * b_last)
        return end * cov - exact_dot(z, z, ((0,), (0,))), end * scale + alpha_last

    cov, scale = lax.fori_loop(0, n, body, (p0_ref[...], jnp.zeros((), F32)))
    pf_ref[...] = cov
    scale_ref[...] = jnp.full(scale_ref.shape, scale, F32)


def covariance_kernel(k, log_decay, noise, inv_beta, p0, *, interpret=False):
    """``k [B,T,H,K]``, ``log_decay, noise, inv_beta [B,T,H]`` float32 (T a multiple of 16), ``p0
    [B,H,K,K]`` -> the gains ``[B,T,H,K]`` and the final covariance ``[B,H,K,K]``, float32."""
    batch, time, heads, key_dim = k.shape
    seq = lambda *d: spec((None, time, None, *d), lambda i, h: (i, 0, h, *(0 for _ in d)))
    cov = spec((None, None, key_dim, key_dim), lambda i, h: (i, h, 0, 0))
    gains, final, scale = launch(
        _covariance_kernel, grid=(batch, heads),
        in_specs=[seq(key_dim), seq(), seq(), seq(), cov],
        out_specs=[seq(key_dim), cov, spec((None, None, SUB), lambda i, h: (i, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(p0.shape, F32),
                   jax.ShapeDtypeStruct((batch, heads, SUB), F32)],
        interpret=interpret, name="covariance_pass")(k, log_decay, noise, inv_beta, p0)
    final = final + scale[..., :1, None] * jnp.eye(key_dim, dtype=F32)
    return gains, 0.5 * (final + jnp.swapaxes(final, -1, -2))


def _kernel_path(k, log_decay, noise, precision, p0, *, multiple, interpret=False):
    time = k.shape[1]
    # Padded steps observe nothing (k = 0, unit noise) and neither decay nor add noise.
    k, log_decay, noise = (pad_time(x, multiple) for x in (k, log_decay, noise))
    inv_beta = pad_time(1.0 / precision, multiple, 1.0)
    gains, final = covariance_kernel(k, log_decay, noise, inv_beta, p0, interpret=interpret)
    return gains[:, :time], final


@functools.lru_cache(maxsize=None)
def _pass(chunk: int, interpret: bool):
    """The pass as a `jax.custom_vjp` of ``(k, log_decay, noise, precision, P_0)``: the kernel on CUDA
    (or in the interpreter), the chunked reference elsewhere; the derivative is the reference's."""
    def reference(k, log_decay, noise, precision, p0):
        return chunked.covariance_pass(k, k, log_decay, noise, precision, p0, chunk_size=chunk,
                                       variance=False)[:2]

    return differentiated_by_reference(functools.partial(_kernel_path, multiple=max(chunk, SUB)), reference,
                                       interpret)


def covariance_pass(q, k, log_decay, noise, precision, initial_covariance, *, chunk_size=64,
                    variance: bool = False, interpret: bool = False):
    """The gains ``Kg [B,T,H,K]`` and the final covariance ``[B,H,K,K]`` (float32) of the exact family
    with a scalar or no decay (``log_decay`` None or ``[B,T,H]``) and isotropic process noise ``noise_t
    I`` (``[B,T,H]``, zeros without noise), precisions ``beta [B,T,H]``, from ``P_0 [B,H,K,K]``.

    Same signature and results as its plain-JAX reference `filters.chunked.covariance_pass`, which runs
    off CUDA and gives the derivative. The kernel works in blocks of 16 steps, the reference in chunks of
    ``chunk_size``: the filter is exact either way, only rounding differs. The predictive variance
    (``variance=True``, the diagnostics) is not computed here: ``q`` is unused, the third result None.
    """
    del q
    if variance:
        raise ValueError("the Pallas covariance pass does not compute the predictive variance; "
                         "use the chunked lowering for diagnostics")
    f32 = lambda x: x.astype(F32)
    log_decay = jnp.zeros(k.shape[:3], F32) if log_decay is None else f32(log_decay)
    gains, final = _pass(chunk_size, interpret)(k, log_decay, f32(noise), f32(precision),
                                               f32(initial_covariance))
    return gains, final, None
