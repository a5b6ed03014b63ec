"""The transition ``A_t`` in its four kinds, as the few operations the filters need.

A transition value is ``None`` (identity), a log decay ``[..., ]`` (scalar kind), a log decay
``[..., K]`` (diagonal kind), or a matrix ``[..., K, K]`` (dense kind). Decays live in log space so
that products over time are sums, which neither underflow nor lose precision.
"""
from __future__ import annotations

import jax.numpy as jnp


def apply(x, kind: str, value):
    """``A X`` for ``X [..., K, R]`` (the state ``S [K, V]``, or a stack of them)."""
    if kind == "identity" or value is None:
        return x
    if kind == "scalar":
        return x * jnp.exp(value)[..., None, None]
    if kind == "diagonal":
        return x * jnp.exp(value)[..., :, None]
    return value @ x


def congruence(p, kind: str, value):
    """``A P A^T`` for ``P [..., K, K]``."""
    if kind == "identity" or value is None:
        return p
    if kind == "scalar":
        return p * jnp.exp(2 * value)[..., None, None]
    if kind == "diagonal":
        a = jnp.exp(value)
        return p * a[..., :, None] * a[..., None, :]
    return value @ p @ jnp.swapaxes(value, -1, -2)


def as_matrix(kind: str, value, key_dim: int, batch_shape, dtype):
    """``A`` as a dense ``[..., K, K]`` array."""
    eye = jnp.eye(key_dim, dtype=dtype)
    if kind == "identity" or value is None:
        return jnp.broadcast_to(eye, (*batch_shape, key_dim, key_dim))
    if kind == "scalar":
        return jnp.exp(value)[..., None, None] * eye
    if kind == "diagonal":
        return jnp.exp(value)[..., None] * eye
    return value
