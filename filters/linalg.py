"""Small dense factorizations in plain XLA ops, differentiated implicitly.

Why not ``jnp.linalg``: on CPU, jaxlib 0.10's LAPACK kernels (triangular solve, Cholesky, LU) fan a
batch out to XLA's intra-op thread pool and block on it; when several such calls run at once (a chunked
filter issues them side by side) they can exhaust the pool and deadlock (seen on 2 cores: a 20 ms
call never returning). The factorizations here are loops of batched vector operations, which XLA runs
on any platform, and their derivatives are the implicit ones of the factorization (a few triangular
products), not the loop unrolled:

* ``X = (I + N)^{-1}`` (``N`` strictly lower):  ``N_bar = tril(-X^T X_bar X^T, -1)``;
* ``X = L^{-1}`` (``L`` lower):                  ``L_bar = tril(-X^T X_bar X^T)``;
* ``L = chol(A)``:  ``A_bar = sym(L^{-T} Phi(L^T L_bar) L^{-1})``, ``Phi`` = lower triangle with half
  the diagonal (the transpose of ``dL = L Phi(L^{-1} dA L^{-T})``);
* ``X = A^{-1}`` (Gauss-Jordan with partial pivoting): ``A_bar = -X^T X_bar X^T``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _row(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=False)


def _set_row(x, row, i):
    return jax.lax.dynamic_update_index_in_dim(x, row[..., None, :], i, axis=-2)


def _forward_substitution(strict):
    """``(I + N)^{-1}`` for strictly lower ``N [..., C, C]``, one row at a time."""
    size = strict.shape[-1]
    eye = jnp.eye(size, dtype=strict.dtype)

    def body(i, inverse):
        # Row i of (I + N) X = I: X_i = e_i - sum_{j < i} N_ij X_j (rows j >= i of X are still zero).
        row = eye[i] - jnp.einsum("...j,...jc->...c", _row(strict, i), inverse)
        return _set_row(inverse, row, i)

    return jax.lax.fori_loop(0, size, body, jnp.zeros_like(strict))


@jax.custom_vjp
def unit_lower_inverse(strict):
    """``(I + N)^{-1}`` for a strictly lower-triangular ``N [..., C, C]``."""
    return _forward_substitution(strict)


def _unit_lower_inverse_fwd(strict):
    inverse = _forward_substitution(strict)
    return inverse, inverse


def _unit_lower_inverse_bwd(inverse, cotangent):
    return (jnp.tril(-_mT(inverse) @ cotangent @ _mT(inverse), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _lower_inverse_forward(lower):
    diagonal = jnp.diagonal(lower, axis1=-2, axis2=-1)
    unit = lower / diagonal[..., None, :]                      # L = (I + N) diag(d)
    return _forward_substitution(jnp.tril(unit, -1)) / diagonal[..., :, None]


@jax.custom_vjp
def lower_inverse(lower):
    """``L^{-1}`` for a lower-triangular ``L [..., C, C]`` with a non-zero diagonal."""
    return _lower_inverse_forward(lower)


def _lower_inverse_fwd(lower):
    inverse = _lower_inverse_forward(lower)
    return inverse, inverse


def _lower_inverse_bwd(inverse, cotangent):
    return (jnp.tril(-_mT(inverse) @ cotangent @ _mT(inverse)),)


lower_inverse.defvjp(_lower_inverse_fwd, _lower_inverse_bwd)


def _cholesky_forward(matrix):
    size = matrix.shape[-1]
    index = jnp.arange(size)

    def body(j, carry):
        work, factor = carry
        column = jax.lax.dynamic_index_in_dim(work, j, axis=-1, keepdims=False)   # A[:, j]
        pivot = jnp.sqrt(jax.lax.dynamic_index_in_dim(column, j, axis=-1, keepdims=False))
        column = jnp.where(index >= j, column / pivot[..., None], 0.0)
        factor = jax.lax.dynamic_update_index_in_dim(factor, column[..., :, None], j, axis=-1)
        return work - column[..., :, None] * column[..., None, :], factor

    _, factor = jax.lax.fori_loop(0, size, body, (matrix, jnp.zeros_like(matrix)))
    return factor


@jax.custom_vjp
def cholesky(matrix):
    """Lower Cholesky factor of a symmetric positive-definite ``A [..., C, C]`` (right-looking)."""
    return _cholesky_forward(matrix)


def _cholesky_fwd(matrix):
    factor = _cholesky_forward(matrix)
    return factor, factor


def _cholesky_bwd(factor, cotangent):
    inverse = _lower_inverse_forward(factor)
    phi = _mT(factor) @ cotangent
    phi = jnp.tril(phi) - 0.5 * jnp.eye(phi.shape[-1], dtype=phi.dtype) * phi
    grad = _mT(inverse) @ phi @ inverse
    return (0.5 * (grad + _mT(grad)),)


cholesky.defvjp(_cholesky_fwd, _cholesky_bwd)


def _inverse_forward(matrix):
    size = matrix.shape[-1]
    augmented = jnp.concatenate([matrix, jnp.broadcast_to(jnp.eye(size, dtype=matrix.dtype), matrix.shape)], -1)
    index = jnp.arange(size)

    def body(j, aug):
        column = jax.lax.dynamic_index_in_dim(aug, j, axis=-1, keepdims=False)
        pivot_row = jnp.argmax(jnp.where(index >= j, jnp.abs(column), -1.0), axis=-1)     # partial pivoting
        row_j, row_p = _row(aug, j), jnp.take_along_axis(aug, pivot_row[..., None, None], axis=-2)[..., 0, :]
        swap = (index == j)[..., :, None] * (row_p - row_j)[..., None, :] + \
            (index == pivot_row[..., None])[..., :, None] * (row_j - row_p)[..., None, :]
        aug = aug + swap
        row = _row(aug, j) / jax.lax.dynamic_index_in_dim(_row(aug, j), j, axis=-1, keepdims=False)[..., None]
        factors = jax.lax.dynamic_index_in_dim(aug, j, axis=-1, keepdims=False)
        factors = jnp.where(index == j, 0.0, factors)
        aug = aug - factors[..., :, None] * row[..., None, :]
        return _set_row(aug, row, j)

    return jax.lax.fori_loop(0, size, body, augmented)[..., size:]


@jax.custom_vjp
def inverse(matrix):
    """``A^{-1}`` for a non-singular ``A [..., K, K]`` (Gauss-Jordan with partial pivoting)."""
    return _inverse_forward(matrix)


def _inverse_fwd(matrix):
    result = _inverse_forward(matrix)
    return result, result


def _inverse_bwd(result, cotangent):
    return (-_mT(result) @ cotangent @ _mT(result),)


inverse.defvjp(_inverse_fwd, _inverse_bwd)
