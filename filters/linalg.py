"""Small dense factorizations, differentiated implicitly: plain XLA ops on CPU, the vendor library elsewhere.

Why not ``jnp.linalg`` on CPU: jaxlib 0.10's LAPACK kernels (triangular solve, Cholesky, LU) fan a
batch out to XLA's intra-op thread pool and block on it; when several such calls run at once (a chunked
filter issues them side by side) they can exhaust the pool and deadlock (seen on 2 cores: a 20 ms
call never returning). The factorizations here are batched vector operations and matmuls, which XLA
runs on any platform (triangular inverses and Cholesky recurse on 2 x 2 blocks, whose off-diagonal
blocks and Schur complements are matmuls, down to blocks of 8 factorized by unrolled loops), and their
derivatives are the implicit ones of the factorization (a few triangular products), not the
recursion differentiated:

* ``X = (I + N)^{-1}`` (``N`` strictly lower):  ``N_bar = tril(-X^T X_bar X^T, -1)``;
* ``X = L^{-1}`` (``L`` lower):                  ``L_bar = tril(-X^T X_bar X^T)``;
* ``L = chol(A)``:  ``A_bar = sym(L^{-T} Phi(L^T L_bar) L^{-1})``, ``Phi`` = lower triangle with half
  the diagonal (the transpose of ``dL = L Phi(L^{-1} dA L^{-T})``);
* ``(L, X) = (chol(A), chol(A)^{-1})``: the Cholesky formula with ``L_bar + tril(-X^T X_bar X^T)``;
* ``X = A^{-1}`` (Gauss-Jordan with partial pivoting): ``A_bar = -X^T X_bar X^T``.

On GPUs and TPUs the forward factorizations dispatch (``jax.lax.platform_dependent``, resolved when the
function is lowered, so a CPU program never contains a LAPACK call) to ``jax.lax.linalg`` (cuSOLVER /
cuBLAS on a GPU): one library call instead of the unrolled recursion, whose training steps took
minutes to compile on an H200. The derivatives are the same implicit formulas on every platform.
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


_BASE = 8   # blocks of at most this size are factorized by unrolled vector loops, larger ones recursively


def _join(top_left, bottom_left, bottom_right):
    """The block lower-triangular matrix ``[[TL, 0], [BL, BR]]``."""
    zeros = jnp.zeros(top_left.shape[:-1] + bottom_right.shape[-1:], top_left.dtype)
    return jnp.concatenate([jnp.concatenate([top_left, zeros], -1),
                            jnp.concatenate([bottom_left, bottom_right], -1)], -2)


def _split(size):
    """Where a recursive block split cuts ``size``: about half, on a multiple of ``_BASE``."""
    half = (size + 1) // 2
    return half if half <= _BASE else -(-half // _BASE) * _BASE


def _base_lower_inverse(lower):
    """``L^{-1}`` of a small lower ``L``, forward substitution unrolled row by row."""
    size = lower.shape[-1]
    eye = jnp.eye(size, dtype=lower.dtype)
    rows = []
    for i in range(size):
        # Row i of L X = I: X_i = (e_i - sum_{j < i} L_ij X_j) / L_ii.
        row = jnp.broadcast_to(eye[i], lower.shape[:-2] + (size,))
        for j in range(i):
            row = row - lower[..., i, j, None] * rows[j]
        rows.append(row / lower[..., i, i, None])
    return jnp.stack(rows, -2)


def _triangular_inverse(lower):
    """``L^{-1}`` for a lower ``L [..., C, C]``, recursively: ``[[X11, 0], [-X22 L21 X11, X22]]``."""
    size = lower.shape[-1]
    if size <= _BASE:
        return _base_lower_inverse(lower)
    n1 = _split(size)
    x11 = _triangular_inverse(lower[..., :n1, :n1])
    x22 = _triangular_inverse(lower[..., n1:, n1:])
    return _join(x11, -(x22 @ (lower[..., n1:, :n1] @ x11)), x22)


def _base_cholesky(matrix):
    """Lower Cholesky factor of a small matrix, right-looking, unrolled column by column."""
    size = matrix.shape[-1]
    work, columns = matrix, []
    for j in range(size):
        pivot = jnp.sqrt(work[..., 0, 0])
        column = work[..., :, 0] / pivot[..., None]                        # L[j:, j]
        columns.append(jnp.pad(column, [(0, 0)] * (column.ndim - 1) + [(j, 0)]))
        work = work[..., 1:, 1:] - column[..., 1:, None] * column[..., None, 1:]
    return jnp.stack(columns, -1)


def _cholesky_and_inverse(matrix):
    """``(L, L^{-1})`` for a symmetric positive-definite ``A [..., C, C]``, recursively by blocks::

        L11 = chol(A11),  L21 = A21 L11^{-T},  L22 = chol(A22 - L21 L21^T),  X21 = -X22 L21 X11

    Only blocks of at most ``_BASE`` are factorized by (unrolled) loops; the rest is matmuls.
    """
    size = matrix.shape[-1]
    if size <= _BASE:
        factor = _base_cholesky(matrix)
        return factor, _base_lower_inverse(factor)
    n1 = _split(size)
    l11, x11 = _cholesky_and_inverse(matrix[..., :n1, :n1])
    l21 = matrix[..., n1:, :n1] @ _mT(x11)
    l22, x22 = _cholesky_and_inverse(matrix[..., n1:, n1:] - l21 @ _mT(l21))
    return _join(l11, l21, l22), _join(x11, -(x22 @ (l21 @ x11)), x22)


def _library_lower_inverse(lower):
    """``L^{-1}`` by the platform's triangular solve (``L X = I``)."""
    eye = jnp.broadcast_to(jnp.eye(lower.shape[-1], dtype=lower.dtype), lower.shape)
    return jax.lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)


def _library_cholesky_and_inverse(matrix):
    """``(L, L^{-1})`` by the platform's Cholesky and triangular solve."""
    factor = jnp.tril(jax.lax.linalg.cholesky(matrix, symmetrize_input=False))
    return factor, _library_lower_inverse(factor)


def _lower_inverse_any(lower):
    return jax.lax.platform_dependent(lower, cpu=_triangular_inverse, default=_library_lower_inverse)


def _cholesky_and_inverse_any(matrix):
    return jax.lax.platform_dependent(matrix, cpu=_cholesky_and_inverse, default=_library_cholesky_and_inverse)


@jax.custom_vjp
def unit_lower_inverse(strict):
    """``(I + N)^{-1}`` for a strictly lower-triangular ``N [..., C, C]``."""
    return _lower_inverse_any(jnp.tril(strict, -1) + jnp.eye(strict.shape[-1], dtype=strict.dtype))


def _unit_lower_inverse_fwd(strict):
    inverse = _lower_inverse_any(jnp.tril(strict, -1) + jnp.eye(strict.shape[-1], dtype=strict.dtype))
    return inverse, inverse


def _unit_lower_inverse_bwd(inverse, cotangent):
    return (jnp.tril(-_mT(inverse) @ cotangent @ _mT(inverse), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


@jax.custom_vjp
def lower_inverse(lower):
    """``L^{-1}`` for a lower-triangular ``L [..., C, C]`` with a non-zero diagonal."""
    return _lower_inverse_any(jnp.tril(lower))


def _lower_inverse_fwd(lower):
    inverse = _lower_inverse_any(jnp.tril(lower))
    return inverse, inverse


def _lower_inverse_bwd(inverse, cotangent):
    return (jnp.tril(-_mT(inverse) @ cotangent @ _mT(inverse)),)


lower_inverse.defvjp(_lower_inverse_fwd, _lower_inverse_bwd)


def _cholesky_cotangent(factor, inverse, cotangent):
    """``A_bar = sym(L^{-T} Phi(L^T L_bar) L^{-1})``."""
    phi = _mT(factor) @ cotangent
    phi = jnp.tril(phi) - 0.5 * jnp.eye(phi.shape[-1], dtype=phi.dtype) * phi
    grad = _mT(inverse) @ phi @ inverse
    return 0.5 * (grad + _mT(grad))


@jax.custom_vjp
def cholesky(matrix):
    """Lower Cholesky factor of a symmetric positive-definite ``A [..., C, C]`` (recursive blocks)."""
    return _cholesky_and_inverse_any(matrix)[0]


def _cholesky_fwd(matrix):
    factor, inverse = _cholesky_and_inverse_any(matrix)
    return factor, (factor, inverse)


def _cholesky_bwd(residuals, cotangent):
    return (_cholesky_cotangent(*residuals, cotangent),)


cholesky.defvjp(_cholesky_fwd, _cholesky_bwd)


@jax.custom_vjp
def cholesky_with_inverse(matrix):
    """``(L, L^{-1})`` for a symmetric positive-definite ``A [..., C, C]``, from one recursion."""
    return _cholesky_and_inverse_any(matrix)


def _cholesky_with_inverse_fwd(matrix):
    factor, inverse = _cholesky_and_inverse_any(matrix)
    return (factor, inverse), (factor, inverse)


def _cholesky_with_inverse_bwd(residuals, cotangents):
    factor, inverse = residuals
    factor_bar, inverse_bar = cotangents
    # X = L^{-1} adds L_bar += tril(-X^T X_bar X^T); then the Cholesky formula.
    factor_bar = factor_bar + jnp.tril(-_mT(inverse) @ inverse_bar @ _mT(inverse))
    return (_cholesky_cotangent(factor, inverse, factor_bar),)


cholesky_with_inverse.defvjp(_cholesky_with_inverse_fwd, _cholesky_with_inverse_bwd)


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


def _inverse_any(matrix):
    return jax.lax.platform_dependent(matrix, cpu=_inverse_forward, default=jnp.linalg.inv)


@jax.custom_vjp
def inverse(matrix):
    """``A^{-1}`` for a non-singular ``A [..., K, K]`` (Gauss-Jordan with partial pivoting on CPU, LU elsewhere)."""
    return _inverse_any(matrix)


def _inverse_fwd(matrix):
    result = _inverse_any(matrix)
    return result, result


def _inverse_bwd(result, cotangent):
    return (-_mT(result) @ cotangent @ _mT(result),)


inverse.defvjp(_inverse_fwd, _inverse_bwd)
