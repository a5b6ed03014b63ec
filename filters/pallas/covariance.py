"""The Pallas GPU kernel of the exact family's covariance pass (the Bayesian Layer).

With a scalar (or no) decay and isotropic noise ``Q_t = q_t I`` (or noise along the key, below) the
covariance recursion never sees the values, so it runs first and hands the gains ``Kg_t`` to the
delta-rule kernels (erase key ``k``, write key ``Kg``). One program carries one head's ``P [K, K]``
(float32, in registers or through its output block) through the sequence in blocks of 16 steps (or 32:
``TUNING[...]["block"]``, measured slower). For a block starting from ``P_c`` (``b_i`` the log decay
accumulated in the block, ``gamma_i = exp(b_i)``, ``R_ij = exp(b_i - b_j)`` for ``j <= i``, ``alpha_i =
sum_{m<=i} q_m R_im^2`` the noise accumulated since the block start)::

    Sigma = (K gamma) P_c (K gamma)^T + E * (K K^T) + diag(1 / beta),  E_ij = R_max(i,j)min(i,j) alpha_min(i,j)
    Sigma = L L^T,  X = L^{-1}                         (the block's observations one by one)
    Kg_i  = [gamma_i (X K gamma P_c)_i + sum_m X_im R_im alpha_m k_m] / L_ii
    Z     = gamma_C X (K gamma) P_c + X (K * R_C. alpha)
    P_C   = gamma_C^2 P_c + alpha_C I - Z^T Z

(the derivation is the chunked lowering's, `filters.chunked`). With process noise along the key, ``Q_t =
q_t k_t k_t^T`` (`designmodels.KeyNoise`), the same kernels take ``Rg = R * (K K^T)``: Sigma's noise part
is ``Rg diag(q) Rg^T``, ``X`` is followed by ``X Rg`` in the gains' and ``Z``'s noise parts, and ``alpha_C I``
becomes ``K^T diag(q R_C.^2) K`` (`_block`). The 16 x 16 Cholesky factor and its inverse are computed
in the kernel (column by column, then forward substitution; or, ``factor="one_loop"``, in one
elimination). This recursion is where precision is spent, so every product keeps
float32's accuracy: three TF32 products on the tensor cores (``a_hi b_hi + a_hi b_lo + a_lo b_hi``),
measured as accurate as IEEE products here and 13x faster on an H200, or IEEE float32 products with
``precision="highest"``. `TUNING` holds the launch and form of each (docs/results/gpu_kernels.md).

The backward kernel walks the blocks in reverse, one program per head, the cotangent ``dP`` of the
covariance carried through its output block (``TUNING carry="memory"``; in registers, Triton's compile
of the K = 128 kernel did not end within minutes on an H200). It needs every block's ``P_c``: by default
the differentiated forward pass stores them (``[B, H, T/16, K, K]`` float32, held until the backward
pass: 1 GiB at B4 T4096 H16 K128; a pass that is not differentiated stores none), or
(``TUNING[...backward]["checkpoints"] = "rerun"``, memory first) the backward pass reruns the forward
kernel to store them. Each block is recomputed from its ``P_c`` (`_block`, its 16 x 16
factorization included) and differentiated by hand (`_block_backward`: the reverse of the formulas
above, the Cholesky factor's by Murray's formula), so the kernel's derivative is exact, the same as
JAX's of the block (tested in float64). Storing each block's ``X = L^{-1}`` and pivots in the forward
kernel instead, so that the backward kernel does not factor again, was measured slower: 46.2 against
36.3 ms forward+backward (B4 T4096 H16 K128, one H200 run, 2026-12-02): the stores and loads of the small
tiles cost more than the factorization they save.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from filters import chunked
from filters.pallas.common import (SUB, exact_dot, iota2, launch, masked_exp,
                                   on_gpu, pad_time, pltriton, rows, settings_key, spec, tuning)
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

    eye = (r == c).astype(matrix.dtype)
    _, _, whiten, pivots = lax.fori_loop(0, size, body, (matrix, eye, jnp.zeros_like(matrix),
                                                         jnp.zeros((size,), matrix.dtype)))
    return whiten, pivots


def _whitening_two_loops(matrix):
    """`whitening_tile`'s results from `cholesky_tile` and the unit factor's inverse by substitution."""
    r, c = iota2(matrix.shape[0])
    factor = cholesky_tile(matrix)
    pivots = jnp.sum(jnp.where(r == c, factor, 0.0), axis=1)
    unit = factor / pivots[:, None]
    return unit_lower_inverse_tile(jnp.where(c < r, unit, 0.0)) / pivots[None, :], pivots


def _whitening(factor: str):
    """The kernel's ``Sigma -> (L^{-1}, diag(L))`` for ``TUNING[...]["factor"]``: ``"one_loop"``
    (`whitening_tile`) or ``"two_loops"`` (Cholesky, then substitution). (A third, the unit factor's
    inverse by three levels of block products instead of 15 substitution steps, was no faster on an H200
    (6.11 against 6.18 ms, 2026-12-02): the 16 Cholesky steps hold the block; removed.)"""
    forms = {"one_loop": whitening_tile, "two_loops": _whitening_two_loops}
    if factor not in forms:
        raise ValueError(f"TUNING covariance factor={factor!r}; accepted: {', '.join(map(repr, forms))}")
    return forms[factor]


def _products(kind: str, interpret: bool):
    """The kernel's float32 products: ``"ieee"`` (IEEE float32 on the CUDA cores) or ``"tf32x3"``
    (three TF32 products on the tensor cores, ``a_hi b_hi + a_hi b_lo + a_lo b_hi``: about float32's
    accuracy; the interpreter, whose CPU has no TF32, takes IEEE products instead)."""
    if kind == "ieee" or interpret:
        return exact_dot
    return lambda a, b, contract=((1,), (0,)): lax.dot_general(
        a, b, (contract, ((), ())), precision=lax.DotAlgorithmPreset.TF32_TF32_F32_X3, preferred_element_type=F32)


def _block(k, log_decay, noise, inv_beta, cov, scale, *, dot, whitening, key_noise=False):
    """One block of ``C`` steps from ``P_c = cov + scale I`` (module doc): the gains ``[C, K]`` and what
    ``P_{c+1} = gamma_C^2 P_c + alpha_C I - Z^T Z`` (key noise: ``+ K^T diag(q R_C.^2) K`` for ``alpha_C I``,
    ``k_left^T K``) is made of, with every intermediate the backward pass reuses.

    The two noises share one form: with ``Y = X`` and ``c = alpha`` (isotropic) or ``Y = X Rg`` and ``c =
    q`` (key noise, ``Rg = R * K K^T``), the gains' noise part is ``(Y * R)(K * c)`` and ``Z``'s is ``Y (K *
    R_C. c)`` (the chunked lowering's formulas, `filters.chunked`). Sigma's noise part is ``E * (K K^T)``,
    ``E`` built from the lower ``R`` rather than as ``exp(-|b_i - b_j|)`` (the same values, but a derivative
    that is right where decays vanish: ``|x|`` has none at 0), or ``Rg diag(q) Rg^T``."""
    r, c = iota2(k.shape[0])
    last = lax.broadcasted_iota(jnp.int32, (k.shape[0],), 0) == k.shape[0] - 1
    b, gamma, decay, alpha = block_terms(log_decay, noise)
    b_last = jnp.sum(jnp.where(last, b, 0.0))
    k_gamma = k * gamma[:, None]                                                  # G = K gamma
    kg_p = dot(k_gamma, cov) + scale * k_gamma                                    # M = G P_c
    gram = dot(k, k, ((1,), (1,)))
    if key_noise:
        spread = None
        rg = decay * gram                                                         # Rg = R * (K K^T)
        noise_part = dot(rg * noise[None, :], rg, ((1,), (1,)))                   # Rg diag(q) Rg^T
        carrier = noise
    else:
        spread = jnp.where(c <= r, decay * alpha[None, :], decay.T * alpha[:, None])   # E
        rg, noise_part, carrier = None, spread * gram, alpha
    sigma = dot(kg_p, k_gamma, ((1,), (1,))) + noise_part + jnp.where(r == c, inv_beta[:, None], 0.0)
    sigma = 0.5 * (sigma + sigma.T)
    whiten, pivots = whitening(sigma)                                             # X = L^{-1}, diag(L)
    kt_p = dot(whiten, kg_p)                                                      # U = X M
    mix = dot(whiten, rg) if key_noise else whiten                                # Y
    k_carrier = k * carrier[:, None]
    gains = (gamma[:, None] * kt_p + dot(mix * decay, k_carrier)) / pivots[:, None]
    to_end = jnp.exp(b_last - b)                                                  # R_C.
    tail = to_end * carrier
    z = jnp.exp(b_last) * kt_p + dot(mix, k * tail[:, None])
    return dict(b=b, gamma=gamma, decay=decay, alpha=alpha, b_last=b_last, k_gamma=k_gamma, kg_p=kg_p,
                spread=spread, gram=gram, rg=rg, sigma=sigma, whiten=whiten, pivots=pivots, kt_p=kt_p, mix=mix,
                carrier=carrier, k_carrier=k_carrier, gains=gains, to_end=to_end, tail=tail, z=z,
                k_left=k * (noise * to_end * to_end)[:, None] if key_noise else None,
                alpha_last=0.0 if key_noise else jnp.sum(jnp.where(last, alpha, 0.0)))


def _next_covariance(blk, k, cov, *, dot):
    """``P_{c+1}`` from ``P_c`` (``cov``, without the carried ``scale I``, which the caller advances) and the
    block's intermediates: ``gamma_C^2 P_c - Z^T Z`` (``+ k_left^T K`` with key noise)."""
    new = jnp.exp(2.0 * blk["b_last"]) * cov - dot(blk["z"], blk["z"], ((0,), (0,)))
    if blk["k_left"] is not None:
        new = new + dot(blk["k_left"], k, ((0,), (0,)))
    return new


def _block_backward(blk, k, noise, cov, d_gains, d_next, *, dot):
    """The cotangents of one block's inputs ``(k, log_decay, noise, inv_beta, P_c)`` from those of its
    gains and of ``P_{c+1}`` (symmetric), ``blk`` being `_block`'s intermediates from ``P_c``. ``cov`` and
    ``d_next`` are functions that return ``P_c`` and ``dP_{c+1}`` (``K x K``): each use loads them anew,
    so that a kernel need not hold them in registers through the block.

    Reverse mode through `_block`'s formulas, last first: ``P_{c+1}`` gives ``dP_c = gamma_C^2
    dP_{c+1}``, ``dZ = -2 Z dP_{c+1}``; ``Z``, the gains and ``U = X M`` give ``dY``, ``dX``, ``dM`` and the
    key, decay and noise terms; the Cholesky factor's (Murray 2016) ``dSigma = sym(X^T Phi(L^T dL) X)``
    with ``dL = tril(-X^T tril(dX) X^T) + diag(d pivots)``, ``L = Sigma X^T`` and ``Phi`` the lower
    triangle with its diagonal halved; then ``Sigma = M G^T + (noise part) + diag(1 / beta)``, ``M = G P_c``
    and the decay terms, whose exponents are all differences of ``b = cumsum(log a)``."""
    key_noise = blk["rg"] is not None
    r, c = iota2(k.shape[0])
    rk, ck = iota2(blk["kg_p"].shape[1])
    last = lax.broadcasted_iota(jnp.int32, (k.shape[0],), 0) == k.shape[0] - 1
    gamma, decay, alpha, whiten, pivots = blk["gamma"], blk["decay"], blk["alpha"], blk["whiten"], blk["pivots"]
    mix, carrier, to_end = blk["mix"], blk["carrier"], blk["to_end"]
    lower = c <= r
    g_last = jnp.exp(blk["b_last"])
    # P_{c+1} = gamma_C^2 P_c + alpha_C I (key noise: + K^T diag(q R_C.^2) K) - Z^T Z; its first term's
    # cotangent is added last
    d_b_last = 2.0 * g_last * g_last * jnp.sum(cov() * d_next())
    d_z = -2.0 * dot(blk["z"], d_next())
    if key_noise:
        k_dp = dot(k, d_next())
        d_k = 2.0 * k_dp * (noise * to_end * to_end)[:, None]
        d_left = jnp.sum(k_dp * k, axis=1) * to_end * to_end      # d v * R_C.^2, v = q R_C.^2: q's share
        d_noise = d_left
        d_exponent = 2.0 * d_left * noise                            # and b_C - b's (R_C.^2 = exp(2 (b_C - b)))
    else:
        d_alpha_last = jnp.sum(jnp.where(rk == ck, d_next(), 0.0))
        d_k = jnp.zeros_like(k)
        d_exponent = jnp.zeros_like(carrier)
    # Z = gamma_C U + Y (K * tail)
    d_u = g_last * d_z
    d_b_last += g_last * jnp.sum(blk["kt_p"] * d_z)
    d_mix = dot(d_z, k * blk["tail"][:, None], ((1,), (1,)))
    yt_dz = dot(mix, d_z, ((0,), (0,)))
    d_k += yt_dz * blk["tail"][:, None]
    d_tail = jnp.sum(yt_dz * k, axis=1)
    # gains = (gamma U + (Y * R)(K c)) / pivots
    d_h = d_gains / pivots[:, None]
    d_pivots = -jnp.sum(d_gains * blk["gains"], axis=1) / pivots
    d_u += gamma[:, None] * d_h
    d_gamma = jnp.sum(d_h * blk["kt_p"], axis=1)
    dh_kc = dot(d_h, blk["k_carrier"], ((1,), (1,)))
    d_mix += dh_kc * decay
    d_decay = dh_kc * mix
    yr_dh = dot(mix * decay, d_h, ((0,), (0,)))
    d_k += yr_dh * carrier[:, None]
    d_carrier = jnp.sum(yr_dh * k, axis=1)
    # tail = R_C. c
    d_carrier += d_tail * to_end
    d_exponent += d_tail * blk["tail"]
    # U = X M, and Y = X Rg (key noise) or X
    d_x = dot(d_u, blk["kg_p"], ((1,), (1,)))
    d_m = dot(whiten, d_u, ((0,), (0,)))
    if key_noise:
        d_x += dot(d_mix, blk["rg"], ((1,), (1,)))
        d_rg = dot(whiten, d_mix, ((0,), (0,)))
    else:
        d_x += d_mix
    # X = L^{-1}, pivots = diag(L), L L^T = Sigma
    d_x = jnp.where(lower, d_x, 0.0)
    factor = jnp.where(lower, dot(blk["sigma"], whiten, ((1,), (1,))), 0.0)
    d_l = (jnp.where(lower, -dot(dot(whiten, d_x, ((0,), (0,))), whiten, ((1,), (1,))), 0.0)
           + jnp.where(r == c, d_pivots[:, None], 0.0))
    phi = dot(factor, d_l, ((0,), (0,)))
    phi = jnp.where(c < r, phi, jnp.where(r == c, 0.5 * phi, 0.0))
    d_sigma = dot(dot(whiten, phi, ((0,), (0,))), whiten)
    d_sigma = 0.5 * (d_sigma + d_sigma.T)
    # Sigma = M G^T + (noise part) + diag(1 / beta)
    d_inv_beta = jnp.sum(jnp.where(r == c, d_sigma, 0.0), axis=1)
    d_m += dot(d_sigma, blk["k_gamma"])
    d_g = dot(d_sigma, blk["kg_p"])
    if key_noise:
        # Rg diag(q) Rg^T (dSigma symmetric), then Rg = R * (K K^T)
        ds_rg = dot(d_sigma, blk["rg"])
        d_rg += 2.0 * ds_rg * noise[None, :]
        d_noise += d_carrier + jnp.sum(ds_rg * blk["rg"], axis=0)
        d_decay += d_rg * blk["gram"]
        d_gram = d_rg * decay
        d_k += dot(d_gram, k) + dot(d_gram, k, ((0,), (0,)))
    else:
        # E * (K K^T), E = R alpha_j below the diagonal and its mirror above (dE symmetric: the lower part
        # counts twice); alpha_C; alpha_i = sum_{m <= i} q_m R_im^2
        d_k += 2.0 * dot(d_sigma * blk["spread"], k)
        twice = jnp.where(c < r, 2.0, jnp.where(r == c, 1.0, 0.0)) * d_sigma * blk["gram"]
        d_decay += twice * alpha[None, :]
        d_alpha = d_carrier + jnp.sum(twice * decay, axis=0) + jnp.where(last, d_alpha_last, 0.0)
        d_noise = jnp.sum(d_alpha[:, None] * decay * decay, axis=0)
        d_decay += 2.0 * d_alpha[:, None] * noise[None, :] * decay
    # M = G P_c (P_c symmetric), G = K gamma
    d_g += dot(d_m, cov())
    # symmetrized as two products rather than a K x K transpose (dP_{c+1} is symmetric already)
    d_cov = g_last * g_last * d_next() + 0.5 * (dot(blk["k_gamma"], d_m, ((0,), (0,)))
                                                + dot(d_m, blk["k_gamma"], ((0,), (0,))))
    d_k += d_g * gamma[:, None]
    d_gamma += jnp.sum(d_g * k, axis=1)
    # R_C. = exp(b_C - b), R_ij = exp(b_i - b_j), gamma = exp(b), b = cumsum(log a)
    d_b_last += jnp.sum(d_exponent)
    d_exp = d_decay * decay
    d_b = (jnp.sum(d_exp, axis=1) - jnp.sum(d_exp, axis=0) + d_gamma * gamma - d_exponent
           + jnp.where(last, d_b_last, 0.0))
    d_log_decay = jnp.sum(jnp.where(r >= c, d_b[:, None], 0.0), axis=0)
    return d_k, d_log_decay, d_noise, d_inv_beta, d_cov


def _covariance_kernel(k_ref, ld_ref, noise_ref, inv_beta_ref, p0_ref, gains_ref, pf_ref, scale_ref, *ckpt_ref,
                       size, in_memory, factor, dot, key_noise, interpret):
    n = k_ref.shape[0] // size
    whitening = _whitening(factor)
    barrier = (lambda: None) if interpret else pltriton.debug_barrier
    key_dim = p0_ref.shape[-1]

    # The carry is (P', s) with P = P' + s I: the noise enters as the scalar s, so that no K x K identity
    # occupies registers. P' is carried in registers (K^2 / threads of them per thread), or
    # (``in_memory``) in the output block itself, loaded where it is used and stored at the end of each
    # block: the program's own stores are visible to its threads after a barrier. With ``ckpt_ref`` (the
    # backward pass's checkpoints) every block's P_c is stored as it starts.
    def body(i, cov, scale):
        if in_memory:
            cov = pf_ref[...]
        if ckpt_ref:
            rk, ck = iota2(key_dim)
            ckpt_ref[0][i] = cov + jnp.where(rk == ck, scale, 0.0)
        t0 = pl.multiple_of(i * size, size)
        k = rows(k_ref, t0, size).astype(F32)
        blk = _block(k, rows(ld_ref, t0, size), rows(noise_ref, t0, size), rows(inv_beta_ref, t0, size), cov,
                     scale, dot=dot, whitening=whitening, key_noise=key_noise)
        gains_ref[pl.ds(t0, size), :] = blk["gains"]
        scale = jnp.exp(2.0 * blk["b_last"]) * scale + blk["alpha_last"]
        if not in_memory:
            return _next_covariance(blk, k, cov, dot=dot), scale
        new = _next_covariance(blk, k, pf_ref[...], dot=dot)   # P reloaded: not held through the block
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


def _covariance_backward_kernel(k_ref, ld_ref, noise_ref, inv_beta_ref, ckpt_ref, dgains_ref, dpf_ref,
                                dk_ref, dld_ref, dnoise_ref, dinv_beta_ref, dp0_ref, *, size, in_memory, dot,
                                key_noise, interpret):
    """The blocks in reverse: each recomputed from its checkpoint ``P_c``, then `_block_backward` turns
    the cotangent of ``P_{c+1}`` and of the block's gains into the block's input cotangents and that of
    ``P_c``. The cotangent ``dP`` is carried in registers, or (``in_memory``) in the output block ``dP_0``,
    loaded where it is used; ``P_c`` is loaded from the checkpoints where it is used."""
    n = k_ref.shape[0] // size
    # Cholesky then substitution, whatever the forward kernel's "factor": the one-loop elimination here,
    # with dP through memory and IEEE products, gave gradients 20% off on an H200 (2026-12-02,
    # tests/test_pallas.py::test_covariance_pass[kernel_ieee]; right in the interpreter and with dP in
    # registers), and was never measured faster.
    whitening = _whitening_two_loops
    barrier = (lambda: None) if interpret else pltriton.debug_barrier

    def body(j, d_next):
        i = n - 1 - j
        t0 = pl.multiple_of(i * size, size)
        k = rows(k_ref, t0, size).astype(F32)
        noise = rows(noise_ref, t0, size)
        cov = lambda: ckpt_ref[i]
        blk = _block(k, rows(ld_ref, t0, size), noise, rows(inv_beta_ref, t0, size), cov(), 0.0, dot=dot,
                     whitening=whitening, key_noise=key_noise)
        d_k, d_ld, d_noise, d_inv_beta, d_cov = _block_backward(
            blk, k, noise, cov, rows(dgains_ref, t0, size), (lambda: dp0_ref[...]) if in_memory else (lambda: d_next),
            dot=dot)
        dk_ref[pl.ds(t0, size), :] = d_k
        dld_ref[pl.ds(t0, size)] = d_ld
        dnoise_ref[pl.ds(t0, size)] = d_noise
        dinv_beta_ref[pl.ds(t0, size)] = d_inv_beta
        if not in_memory:
            return d_cov
        barrier()                                 # every thread has read dP before any overwrites it
        dp0_ref[...] = d_cov
        barrier()
        return d_next

    d_final = dpf_ref[...]
    d_final = 0.5 * (d_final + d_final.T)
    if in_memory:
        dp0_ref[...] = d_final
        barrier()
        lax.fori_loop(0, n, body, jnp.zeros((), F32))
    else:
        dp0_ref[...] = lax.fori_loop(0, n, body, d_final)


KERNEL_NAMES = {"tf32x3": "covariance_pass", "ieee": "covariance_pass_ieee"}   # their TUNING entries
BACKWARD_NAMES = {"tf32x3": "covariance_pass_backward", "ieee": "covariance_pass_backward_ieee"}


def _check_products(products):
    if products not in KERNEL_NAMES:
        raise ValueError(f"covariance_kernel(products={products!r}); accepted: {', '.join(map(repr, KERNEL_NAMES))}")


def block_size(products: str) -> int:
    """Steps per block of the covariance kernels (``TUNING[...]["block"]``, 16 or 32; 16 unless set): the
    forward kernel's, which its checkpoints, and so the backward kernel, follow."""
    size = tuning(KERNEL_NAMES[products], "block") or SUB
    if size not in (16, 32):
        raise ValueError(f"TUNING[{KERNEL_NAMES[products]!r}]['block'] = {size!r}; accepted: 16 or 32")
    return size


def _checkpoint_shape(k, size):
    batch, time, heads, key_dim = k.shape
    return batch, heads, time // size, key_dim, key_dim


def _specs(k, size):
    batch, time, heads, key_dim = k.shape
    seq = lambda *d: spec((None, time, None, *d), lambda i, h: (i, 0, h, *(0 for _ in d)))
    cov = spec((None, None, key_dim, key_dim), lambda i, h: (i, h, 0, 0))
    ckpt = spec((None, None, time // size, key_dim, key_dim), lambda i, h: (i, h, 0, 0, 0))    # P_c
    return seq, cov, ckpt


def covariance_kernel(k, log_decay, noise, inv_beta, p0, *, products="tf32x3", checkpoints=False,
                      key_noise=False, interpret=False):
    """``k [B,T,H,K]``, ``log_decay, noise, inv_beta [B,T,H]`` float32 (T a multiple of the block size,
    `block_size`), ``p0 [B,H,K,K]`` -> the gains ``[B,T,H,K]`` and the final covariance ``[B,H,K,K]``,
    float32, and with ``checkpoints`` a third result for the backward kernel: every block's starting
    covariance ``[B,H,T/block,K,K]``. ``key_noise``: ``noise`` is ``q_t`` of ``Q_t = q_t k_t
    k_t^T`` rather than of ``q_t I``. ``products``: ``"tf32x3"`` or ``"ieee"`` (`_products`), each with its
    own launch and form in `TUNING` (``KERNEL_NAMES``: the two were measured best at different settings)."""
    _check_products(products)
    batch, time, heads, key_dim = k.shape
    size = block_size(products)
    seq, cov, ckpt = _specs(k, size)
    kernel = functools.partial(
        _covariance_kernel, size=size, in_memory=tuning(KERNEL_NAMES[products], "carry") == "memory",
        factor=tuning(KERNEL_NAMES[products], "factor") or "two_loops",
        dot=_products(products, interpret), key_noise=key_noise, interpret=interpret)
    outs = launch(
        kernel, grid=(batch, heads),
        in_specs=[seq(key_dim), seq(), seq(), seq(), cov],
        out_specs=[seq(key_dim), cov, spec((None, None, SUB), lambda i, h: (i, h, 0))] + [ckpt] * checkpoints,
        out_shape=[jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(p0.shape, F32),
                   jax.ShapeDtypeStruct((batch, heads, SUB), F32)]
                  + [jax.ShapeDtypeStruct(_checkpoint_shape(k, size), F32)] * checkpoints,
        interpret=interpret, name=KERNEL_NAMES[products], key_dim=key_dim)(k, log_decay, noise, inv_beta, p0)
    gains, final, scale = outs[:3]
    final = final + scale[..., :1, None] * jnp.eye(key_dim, dtype=F32)
    return (gains, 0.5 * (final + jnp.swapaxes(final, -1, -2))) + tuple(outs[3:])


def covariance_backward_kernel(k, log_decay, noise, inv_beta, checkpoints, d_gains, d_final, *,
                               products="tf32x3", key_noise=False, interpret=False):
    """The cotangents ``(dk [B,T,H,K], d log_decay, d noise, d inv_beta [B,T,H], dP_0 [B,H,K,K])`` of
    `covariance_kernel`'s inputs from those of its gains and final covariance, given its
    ``checkpoints`` (its third result, ``P_c`` of every block): one program per head walks the blocks backwards
    (`_covariance_backward_kernel`)."""
    _check_products(products)
    batch, time, heads, key_dim = k.shape
    size = time // checkpoints.shape[2]                       # the forward kernel's blocks
    seq, cov, ckpt = _specs(k, size)
    name = BACKWARD_NAMES[products]
    kernel = functools.partial(_covariance_backward_kernel, size=size, in_memory=tuning(name, "carry") == "memory",
                               dot=_products(products, interpret), key_noise=key_noise, interpret=interpret)
    return launch(
        kernel, grid=(batch, heads),
        in_specs=[seq(key_dim), seq(), seq(), seq(), ckpt, seq(key_dim), cov],
        out_specs=[seq(key_dim), seq(), seq(), seq(), cov],
        out_shape=[jax.ShapeDtypeStruct(k.shape, F32)] + [jax.ShapeDtypeStruct(noise.shape, F32)] * 3
                  + [jax.ShapeDtypeStruct((batch, heads, key_dim, key_dim), F32)],
        interpret=interpret, name=name, key_dim=key_dim)(k, log_decay, noise, inv_beta, checkpoints, d_gains, d_final)


def _padded(k, log_decay, noise, precision, multiple):
    # Padded steps observe nothing (k = 0, unit noise) and neither decay nor add noise.
    k, log_decay, noise = (pad_time(x, multiple) for x in (k, log_decay, noise))
    return k, log_decay, noise, pad_time(1.0 / precision, multiple, 1.0)


@functools.lru_cache(maxsize=None)
def _pass(chunk: int, products: str, interpret: bool, key_noise: bool, settings: str):
    """The pass as a `jax.custom_vjp` of ``(k, log_decay, noise, precision, P_0)``: forward and backward
    kernels on CUDA (or in the interpreter), the chunked reference and its derivative elsewhere. By
    default (``TUNING[...backward]["checkpoints"] = "forward"``) the forward pass stores the checkpoints
    (``P`` at every block start, ``T/16 K^2`` floats per head, held until the backward pass: 1 GiB at B4
    T4096 H16 K128) and the backward pass runs the backward kernel alone; off CUDA the reference then
    carries zeros of their shapes (it needs none). With ``"rerun"`` the backward pass reruns the forward
    kernel for them instead: the residuals are the inputs alone. ``settings``: the kernels' `TUNING` when
    called, a key of the cache only (JAX caches the traces of ``fwd`` and ``bwd``)."""
    multiple = max(chunk, block_size(products))
    keep = tuning(BACKWARD_NAMES[products], "checkpoints") == "forward"

    def reference(k, log_decay, noise, precision, p0):
        return chunked.covariance_pass(k, k, log_decay, noise, precision, p0, chunk_size=chunk,
                                       variance=False, key_noise=key_noise)[:2]

    def kernels(k, log_decay, noise, precision, p0, interpret=False):
        gains, final = covariance_kernel(*_padded(k, log_decay, noise, precision, multiple), p0,
                                         products=products, key_noise=key_noise, interpret=interpret)
        return gains[:, :k.shape[1]], final

    def kernels_keeping(k, log_decay, noise, precision, p0, interpret=False):
        gains, final, checkpoints = covariance_kernel(*_padded(k, log_decay, noise, precision, multiple), p0,
                                                      products=products, checkpoints=True, key_noise=key_noise,
                                                      interpret=interpret)
        return (gains[:, :k.shape[1]], final), checkpoints

    def reference_keeping(k, log_decay, noise, precision, p0):
        padded = _padded(k, log_decay, noise, precision, multiple)[0]
        zeros = jnp.zeros(_checkpoint_shape(padded, block_size(products)), F32)
        return reference(k, log_decay, noise, precision, p0), zeros

    def kernels_vjp(k, log_decay, noise, precision, p0, d_gains, d_final, checkpoints=None, interpret=False):
        time = k.shape[1]
        padded = _padded(k, log_decay, noise, precision, multiple)
        if checkpoints is None:
            checkpoints = covariance_kernel(*padded, p0, products=products, checkpoints=True, key_noise=key_noise,
                                            interpret=interpret)[2]
        d_k, d_log_decay, d_noise, d_inv_beta, d_p0 = covariance_backward_kernel(
            *padded, checkpoints, pad_time(d_gains, multiple), d_final, products=products, key_noise=key_noise,
            interpret=interpret)
        grads = (d_k[:, :time], d_log_decay[:, :time], d_noise[:, :time],
                 -d_inv_beta[:, :time] / (precision * precision), d_p0)
        return tuple(g.astype(a.dtype) for g, a in zip(grads, (k, log_decay, noise, precision, p0)))

    def reference_vjp(k, log_decay, noise, precision, p0, d_gains, d_final, checkpoints=None):
        return jax.vjp(reference, k, log_decay, noise, precision, p0)[1]((d_gains, d_final))

    forward = on_gpu(kernels, reference, interpret)
    forward_keeping = on_gpu(kernels_keeping, reference_keeping, interpret)
    backward = on_gpu(kernels_vjp, reference_vjp, interpret)

    @jax.custom_vjp
    def run(*args):
        return forward(*args)

    def fwd(*args):
        if keep:
            out, checkpoints = forward_keeping(*args)
            return out, (args, checkpoints)
        return forward(*args), (args, None)

    def bwd(saved, cotangents):
        args, checkpoints = saved
        return tuple(backward(*args, *cotangents, *([checkpoints] if keep else [])))

    run.defvjp(fwd, bwd)
    return run


def covariance_pass(q, k, log_decay, noise, precision, initial_covariance, *, chunk_size=64,
                    variance: bool = False, key_noise: bool = False, dot_precision: str = "default",
                    interpret: bool = False):
    """The gains ``Kg [B,T,H,K]`` and the final covariance ``[B,H,K,K]`` (float32) of the exact family
    with a scalar or no decay (``log_decay`` None or ``[B,T,H]``) and isotropic process noise ``noise_t
    I`` (``[B,T,H]``, zeros without noise) or, with ``key_noise``, noise along the key ``noise_t k_t k_t^T``,
    precisions ``beta [B,T,H]``, from ``P_0 [B,H,K,K]``.

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
    settings = settings_key((KERNEL_NAMES[products], BACKWARD_NAMES[products]))
    gains, final = _pass(chunk_size, products, interpret, key_noise, settings)(
        k, log_decay, f32(noise), f32(precision), f32(initial_covariance))
    return gains, final, None
