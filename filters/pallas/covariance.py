"""The Pallas GPU kernel of the exact family's covariance pass (the Bayesian Layer).

With a scalar (or no) decay and isotropic noise ``Q_t = q_t I`` the covariance recursion never sees the
values, so it runs first and hands the gains ``Kg_t`` to the delta-rule kernels (erase key ``k``, write
key ``Kg``). One program carries one head's ``P [K, K]`` (float32, in registers or through its output
block) through the sequence in blocks of 16 steps. For a block starting from ``P_c`` (``b_i`` the log
decay accumulated in the block, ``gamma_i = exp(b_i)``, ``R_ij = exp(b_i - b_j)`` for ``j <= i``,
``alpha_i = sum_{m<=i} q_m R_im^2`` the noise accumulated since the block start)::

    Sigma = (K gamma) P_c (K gamma)^T + (exp(-|b_i - b_j|) alpha_min(i,j)) * (K K^T) + diag(1 / beta)
    Sigma = L L^T,  X = L^{-1}                         (the block's observations one by one)
    Kg_i  = [gamma_i (X K gamma P_c)_i + sum_m X_im R_im alpha_m k_m] / L_ii
    Z     = gamma_C X (K gamma) P_c + X (K * R_C. alpha)
    P_C   = gamma_C^2 P_c + alpha_C I - Z^T Z

(the derivation is the chunked lowering's, `filters.chunked`). The 16 x 16 Cholesky factor and its
inverse are computed in the kernel (column by column, then forward substitution; or, ``factor=
"one_loop"``, in one elimination). This recursion is where precision is spent, so every product keeps
float32's accuracy: three TF32 products on the tensor cores (``a_hi b_hi + a_hi b_lo + a_lo b_hi``),
measured as accurate as IEEE products here and 13x faster on an H200, or IEEE float32 products with
``precision="highest"``. `TUNING` holds the launch and form of each (docs/results/gpu_kernels.md).

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
                                   pad_time, pltriton, rows, spec, tuning)
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


def whitening_tile(matrix):
    """``X = L^{-1}`` and the pivots ``diag(L)`` of the Cholesky factor ``L L^T = A`` of a small symmetric
    positive definite tile, in one elimination of ``[A | I]``: at step ``j``, ``d_j = sqrt(A_jj)``,
    ``l_j = A_{:, j} / d_j`` (rows >= j), row ``j`` of ``X`` is ``B_j / d_j``, then ``A -= l_j l_j^T`` and
    ``B -= l_j X_j`` (``B`` starts as ``I``: the row operations that turn ``L`` into ``I`` turn ``I``
    into ``L^{-1}``). One loop of ``n`` steps where `cholesky_tile` and a substitution take two."""
    size = matrix.shape[0]
    r, c = iota2(size)
    index = lax.broadcasted_iota(jnp.int32, (size,), 0)

    def body(j, carry):
        rest, pending, whiten, pivots = carry
        column = jnp.sum(jnp.where(c == j, rest, 0.0), axis=1)
        pivot = jnp.sqrt(jnp.sum(jnp.where(index == j, column, 0.0)))
        column = jnp.where(index >= j, column / pivot, 0.0)
        row = jnp.sum(jnp.where(r == j, pending, 0.0), axis=0) / pivot
        return (rest - column[:, None] * column[None, :], pending - column[:, None] * row[None, :],
                jnp.where(r == j, row[None, :], whiten), jnp.where(index == j, pivot, pivots))

    eye = (r == c).astype(F32)
    _, _, whiten, pivots = lax.fori_loop(0, size, body, (matrix, eye, jnp.zeros_like(matrix),
                                                         jnp.zeros((size,), F32)))
    return whiten, pivots


def _whitening_two_loops(matrix):
    """`whitening_tile`'s results from `cholesky_tile` and a substitution for the unit factor's inverse."""
    r, c = iota2(matrix.shape[0])
    factor = cholesky_tile(matrix)
    pivots = jnp.sum(jnp.where(r == c, factor, 0.0), axis=1)
    unit = factor / pivots[:, None]
    return unit_lower_inverse_tile(jnp.where(c < r, unit, 0.0)) / pivots[None, :], pivots


def _products(kind: str, interpret: bool):
    """The kernel's float32 products: ``"ieee"`` (IEEE float32 on the CUDA cores) or ``"tf32x3"``
    (three TF32 products on the tensor cores, ``a_hi b_hi + a_hi b_lo + a_lo b_hi``: about float32's
    accuracy; the interpreter, whose CPU has no TF32, takes IEEE products instead)."""
    if kind == "ieee" or interpret:
        return exact_dot
    return lambda a, b, contract=((1,), (0,)): lax.dot_general(
        a, b, (contract, ((), ())), precision=lax.DotAlgorithmPreset.TF32_TF32_F32_X3, preferred_element_type=F32)


def _covariance_kernel(k_ref, ld_ref, noise_ref, inv_beta_ref, p0_ref, gains_ref, pf_ref, scale_ref, *,
                       in_memory, one_loop, dot, interpret):
    n = k_ref.shape[0] // SUB
    r, c = iota2(SUB)
    last = lax.broadcasted_iota(jnp.int32, (SUB,), 0) == SUB - 1
    whitening = whitening_tile if one_loop else _whitening_two_loops
    barrier = (lambda: None) if interpret else pltriton.debug_barrier

    # The carry is (P', s) with P = P' + s I: the noise enters as the scalar s, so that no K x K identity
    # occupies registers. P' is carried in registers (K^2 / threads of them per thread), or
    # (``in_memory``) in the output block itself, loaded where it is used and stored at the end of each
    # block: the program's own stores are visible to its threads after a barrier.
    def body(i, cov, scale):
        if in_memory:
            cov = pf_ref[...]
        t0 = pl.multiple_of(i * SUB, SUB)
        k = rows(k_ref, t0, SUB).astype(F32)
        b, gamma, decay, alpha = block_terms(rows(ld_ref, t0, SUB), rows(noise_ref, t0, SUB))
        k_gamma = k * gamma[:, None]
        kg_p = dot(k_gamma, cov) + scale * k_gamma                                # (K gamma) P_c
        alpha_min = jnp.where(c <= r, alpha[None, :], alpha[:, None])
        sigma = (dot(kg_p, k_gamma, ((1,), (1,)))
                 + jnp.exp(-jnp.abs(b[:, None] - b[None, :])) * alpha_min * dot(k, k, ((1,), (1,)))
                 + jnp.where(r == c, rows(inv_beta_ref, t0, SUB)[:, None], 0.0))
        whiten, pivots = whitening(0.5 * (sigma + sigma.T))                   # X = L^{-1}, diag(L)
        kt_p = dot(whiten, kg_p)
        gains = (gamma[:, None] * kt_p + dot(whiten * decay, k * alpha[:, None])) / pivots[:, None]
        gains_ref[pl.ds(t0, SUB), :] = gains
        b_last = jnp.min(b)
        alpha_last = jnp.sum(jnp.where(last, alpha, 0.0))
        z = jnp.exp(b_last) * kt_p + dot(whiten, k * (jnp.exp(b_last - b) * alpha)[:, None])
        end = jnp.exp(2.0 * b_last)
        scale = end * scale + alpha_last
        if not in_memory:
            return end * cov - dot(z, z, ((0,), (0,))), scale
        new = end * pf_ref[...] - dot(z, z, ((0,), (0,)))   # P reloaded: not held through the block
        barrier()                                 # every thread has read P before any overwrites it
        pf_ref[...] = new
        barrier()                                 # the next block reads what this one stored
        return None, scale

    zero = jnp.zeros((), F32)
    if in_memory:
        pf_ref[...] = p0_ref[...]
        barrier()
        scale = lax.fori_loop(0, n, lambda i, s: body(i, None, s)[1], zero)
    else:
        cov, scale = lax.fori_loop(0, n, lambda i, carry: body(i, *carry), (p0_ref[...], zero))
        pf_ref[...] = cov
    scale_ref[...] = jnp.full(scale_ref.shape, scale, F32)


KERNEL_NAMES = {"tf32x3": "covariance_pass", "ieee": "covariance_pass_ieee"}   # their TUNING entries


def covariance_kernel(k, log_decay, noise, inv_beta, p0, *, products="tf32x3", interpret=False):
    """``k [B,T,H,K]``, ``log_decay, noise, inv_beta [B,T,H]`` float32 (T a multiple of 16), ``p0
    [B,H,K,K]`` -> the gains ``[B,T,H,K]`` and the final covariance ``[B,H,K,K]``, float32. ``products``:
    ``"tf32x3"`` or ``"ieee"`` (`_products`), each with its own launch and form in `TUNING`
    (``KERNEL_NAMES``: the two were measured best at different settings)."""
    if products not in KERNEL_NAMES:
        raise ValueError(f"covariance_kernel(products={products!r}); accepted: {', '.join(map(repr, KERNEL_NAMES))}")
    batch, time, heads, key_dim = k.shape
    seq = lambda *d: spec((None, time, None, *d), lambda i, h: (i, 0, h, *(0 for _ in d)))
    cov = spec((None, None, key_dim, key_dim), lambda i, h: (i, h, 0, 0))
    kernel = functools.partial(
        _covariance_kernel, in_memory=tuning(KERNEL_NAMES[products], "carry") == "memory",
        one_loop=tuning(KERNEL_NAMES[products], "factor") == "one_loop",
        dot=_products(products, interpret), interpret=interpret)
    gains, final, scale = launch(
        kernel, grid=(batch, heads),
        in_specs=[seq(key_dim), seq(), seq(), seq(), cov],
        out_specs=[seq(key_dim), cov, spec((None, None, SUB), lambda i, h: (i, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(p0.shape, F32),
                   jax.ShapeDtypeStruct((batch, heads, SUB), F32)],
        interpret=interpret, name=KERNEL_NAMES[products])(k, log_decay, noise, inv_beta, p0)
    final = final + scale[..., :1, None] * jnp.eye(key_dim, dtype=F32)
    return gains, 0.5 * (final + jnp.swapaxes(final, -1, -2))


def _kernel_path(k, log_decay, noise, precision, p0, *, multiple, products, interpret=False):
    time = k.shape[1]
    # Padded steps observe nothing (k = 0, unit noise) and neither decay nor add noise.
    k, log_decay, noise = (pad_time(x, multiple) for x in (k, log_decay, noise))
    inv_beta = pad_time(1.0 / precision, multiple, 1.0)
    gains, final = covariance_kernel(k, log_decay, noise, inv_beta, p0, products=products, interpret=interpret)
    return gains[:, :time], final


@functools.lru_cache(maxsize=None)
def _pass(chunk: int, products: str, interpret: bool):
    """The pass as a `jax.custom_vjp` of ``(k, log_decay, noise, precision, P_0)``: the kernel on CUDA
    (or in the interpreter), the chunked reference elsewhere; the derivative is the reference's."""
    def reference(k, log_decay, noise, precision, p0):
        return chunked.covariance_pass(k, k, log_decay, noise, precision, p0, chunk_size=chunk,
                                       variance=False)[:2]

    return differentiated_by_reference(functools.partial(_kernel_path, multiple=max(chunk, SUB), products=products),
                                       reference, interpret)


def covariance_pass(q, k, log_decay, noise, precision, initial_covariance, *, chunk_size=64,
                    variance: bool = False, dot_precision: str = "default", interpret: bool = False):
    """The gains ``Kg [B,T,H,K]`` and the final covariance ``[B,H,K,K]`` (float32) of the exact family
    with a scalar or no decay (``log_decay`` None or ``[B,T,H]``) and isotropic process noise ``noise_t
    I`` (``[B,T,H]``, zeros without noise), precisions ``beta [B,T,H]``, from ``P_0 [B,H,K,K]``.

    Same signature and results as its plain-JAX reference `filters.chunked.covariance_pass`, which runs
    off CUDA and gives the derivative. The kernel works in blocks of 16 steps, the reference in chunks of
    ``chunk_size``: the filter is exact either way, only rounding differs. The predictive variance
    (``variance=True``, the diagnostics) is not computed here: ``q`` is unused, the third result None.
    ``dot_precision``: the lowering's ``precision`` option: ``"default"`` takes TF32x3 products on the
    tensor cores (as accurate as IEEE here: docs/results/gpu_kernels.md), ``"highest"`` IEEE float32
    products (on an H200 seven times slower).
    """
    del q
    if variance:
        raise ValueError("the Pallas covariance pass does not compute the predictive variance; "
                         "use the chunked lowering for diagnostics")
    f32 = lambda x: x.astype(F32)
    log_decay = jnp.zeros(k.shape[:3], F32) if log_decay is None else f32(log_decay)
    products = "ieee" if dot_precision == "highest" else "tf32x3"
    gains, final = _pass(chunk_size, products, interpret)(k, log_decay, f32(noise), f32(precision),
                                               f32(initial_covariance))
    return gains, final, None
