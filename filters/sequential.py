"""The sequential lowering: ``lax.scan`` over the exact step of `filters.kalman`. Applies to every
design model; in float64 (``jax_enable_x64``) it is the oracle the other lowerings are tested against."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from filters import kalman, shapes
from filters.inputs import FilterState, StepInputs
from filters.lowering import FilterOutput, Lowering


def time_major(tree):
    return jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 1, 0), tree)


@shapes.typed
def run(structure, x: StepInputs, state: FilterState, *, diagnostics: bool = False) -> FilterOutput:
    x = x.in_compute_dtype()
    key_dim = x.k.shape[-1]
    stationary = structure.stationary_covariance(key_dim)
    stationary = None if stationary is None else jnp.asarray(stationary, x.k.dtype)
    carry_prior = diagnostics and structure.family == "additive"
    if carry_prior:  # only to report the (data-independent) predictive variance
        p0 = jnp.asarray(structure.prior_covariance(key_dim), x.k.dtype)
        state = state._replace(covariance=jnp.broadcast_to(p0, (*state.mean.shape[:2], key_dim, key_dim)))

    def body(carry, xt):
        y, carry, diag = kalman.step(structure, carry, xt, stationary)
        return carry, (y, diag if diagnostics else None)

    final, (ys, diags) = jax.lax.scan(body, state, time_major(x))
    if carry_prior:
        final = final._replace(covariance=None)
    y = jnp.moveaxis(ys, 0, 1)
    if diagnostics:
        return FilterOutput(y, final, kalman.Diagnostics(*(jnp.moveaxis(d, 0, 1) for d in diags)))
    return FilterOutput(y, final)


class Sequential(Lowering):
    name = "sequential"
    summary = ("lax.scan over the exact step; O(T) depth, O(T K^2 V) work (exact family: + O(T K^3) for "
               "A P A^T with a dense A); the float64 oracle")

    def reason_not_applicable(self, structure):
        return None                                  # every design model

    def supports_diagnostics(self, structure):
        return True

    def run(self, structure, x, state, *, diagnostics):
        return run(structure, x, state, diagnostics=diagnostics)


LOWERING = Sequential()
