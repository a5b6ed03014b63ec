"""One exact filter step, per family: the oracle that every lowering is proven against.

All arrays are one time step: ``S [B,H,K,V]``, ``P [B,H,K,K]``, ``q, k [B,H,K]``, ``v [B,H,V]``, gates
``[B,H]``. ``S`` is the posterior mean of the memory in flash-linear-attention's layout (keys by values;
the transpose of the ``V x K`` matrix-normal mean of the design document). The exact (Kalman) step,
predict then update, for the shared key-space covariance::

    S_bar = A S                       P_bar = A P A^T + Q
    u     = P_bar k                   (the write direction)
    s     = k^T u + 1/beta            (innovation variance)
    Kg    = u / s                     (gain; equals beta P k after the update)
    S     = S_bar + Kg (v - S_bar^T k)^T
    P     = P_bar - u Kg^T
    y     = S^T q

The reset family replaces ``P_bar`` by ``sigma^2 I``, so ``Kg = eta k`` with
``eta = sigma^2 beta / (1 + sigma^2 beta |k|^2)``: the delta rule. The additive family has no
observation: ``S = S_bar + s k v^T``, and ``P`` evolves without the data.

Diagnostics, per step: the write gain ``g = k^T Kg`` (the fraction by which the readout at ``k`` moves
to ``v``; ``beta k^T P k`` for the exact family, ``eta |k|^2`` for a reset, ``s |k|^2`` for a latent input),
the predictive variance ``q^T P q`` of the readout, and the log predictive density of the values
``log p(v_t | v_<t)`` (`log_predictive_density`): every value column ``r`` is an independent scalar
observation ``v_t[r] = k_t^T s_r + e_r`` sharing the covariance, so given the past it is Gaussian with
mean ``(S_bar^T k)[r]`` and the innovation variance ``s``, and the columns' log densities add::

    e = v - S_bar^T k                                  (the innovation, [V])
    log p(v_t | v_<t) = -1/2 (V log(2 pi s) + |e|^2 / s)

Its sum over ``t`` is the marginal log-likelihood ``log p(v_1..T)`` (a Kalman filter's, e.g. dynamax's
``lgssm_filter(...).marginal_loglik``, summed over value columns, heads and batch).

* exact family: ``s = k^T P_bar k + 1/beta``, the filter's own;
* reset family: the same density with ``P_bar = sigma^2 I`` (the reset, docs/unification.md), so
  ``s = sigma^2 |k|^2 + 1/beta = sigma^2 / eta``; under the write-strength parameterization the
  observation precision is one by convention (only ``sigma^2 beta`` is identified by the mean), so
  ``s = 1 / (1 - eta |k|^2)``. A reset is a Kalman filter restarted at every step from
  ``N(S_bar, sigma^2 I)``: the product of these conditionals is a proper density of the values, but not
  the marginal likelihood of a state space model of the memory (the reset discards the covariance such a
  model would carry);
* additive family: None. The values are not observed but written (``U_t = s_t k_t v_t^T`` is a known
  input of the transition): the model assigns them no density.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from filters import shapes, transitions
from filters.inputs import FilterState, StepInputs


class Diagnostics(NamedTuple):
    """Per-step diagnostics ``[B, T, H]`` (``[B, H]`` for one step): ``write_gain`` ``g_t``,
    ``predictive_variance`` ``q_t^T P_t q_t`` and ``log_predictive_density`` ``log p(v_t | v_<t)``
    summed over the value columns (module docstring; None for the additive family, whose values are
    inputs, not observations)."""

    write_gain: shapes.SteppedPerHead
    predictive_variance: shapes.SteppedPerHead
    log_predictive_density: Optional[shapes.SteppedPerHead] = None


def log_predictive_density(squared_innovation, innovation_variance, value_dim: int):
    """``log p(v_t | v_<t) = -1/2 (V log(2 pi s) + |e|^2 / s)``: ``V`` independent value columns, each
    ``N(0, s)`` in its innovation ``e[r]``; ``squared_innovation`` is ``|e|^2`` (summed over columns),
    ``innovation_variance`` is ``s``."""
    return -0.5 * (value_dim * jnp.log(2 * jnp.pi * innovation_variance)
                   + squared_innovation / innovation_variance)


def reset_innovation_variance(structure, x: StepInputs):
    """The reset family's ``s = sigma^2 |k|^2 + 1/beta`` (module docstring): ``1 / (1 - eta |k|^2)``
    under the write-strength parameterization (unit observation precision), else ``sigma^2 / eta``."""
    if structure.write_strength:
        return 1.0 / (1.0 - x.write_strength * _dot(x.k, x.k))
    return x.reset_variance / x.write_strength


def _dot(a, b):
    return jnp.sum(a * b, axis=-1)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _matvec(m, x):
    return jnp.einsum("...ij,...j->...i", m, x)


def _read(state, x):
    """``S^T x`` for ``S [..., K, V]`` and ``x [..., K]``: the readout at address ``x``."""
    return jnp.einsum("...kv,...k->...v", state, x)


def symmetrize(p):
    return 0.5 * (p + jnp.swapaxes(p, -1, -2))


def predict_covariance(structure, p, x: StepInputs, stationary_cov):
    """``P_bar = A P A^T + Q`` with ``Q`` as declared (stationary: ``A (P - P_s) A^T + P_s``; key noise:
    ``Q = q_t k_t k_t^T`` with the key of the step about to be written)."""
    kind = structure.transition
    if structure.noise == "stationary":
        return transitions.congruence(p - stationary_cov, kind, x.transition) + stationary_cov
    p_bar = transitions.congruence(p, kind, x.transition)
    if structure.noise == "random_walk":
        p_bar = p_bar + x.process_noise[..., None, None] * jnp.eye(p.shape[-1], dtype=p.dtype)
    elif structure.noise == "key":
        k = x.k.astype(p.dtype)
        p_bar = p_bar + x.process_noise[..., None, None] * _outer(k, k)
    return p_bar


@shapes.typed
def step(structure, state: FilterState, x: StepInputs, stationary_cov: Optional[shapes.KeySquare] = None
         ) -> tuple[shapes.SteppedValues, FilterState, Optional[Diagnostics]]:
    """Advance the filter by one step. Returns ``(y, new_state, Diagnostics or None)``.

    ``state.covariance`` is carried for the exact family; for the others it may be carried only to
    report the predictive variance (then it is propagated, never used by the mean).
    """
    mean = transitions.apply(state.mean, structure.transition, x.transition)
    cov = state.covariance
    log_density = None                              # the additive family observes nothing
    if structure.family == "additive":
        write = x.k if x.input_scale is None else x.k * x.input_scale[..., None]
        mean = mean + _outer(write, x.v)
        gain = _dot(x.k, write)
        if cov is not None:
            cov = predict_covariance(structure, cov, x, stationary_cov)
        variance = None if cov is None else _dot(x.q, _matvec(cov, x.q))
    elif structure.family == "reset":
        eta = x.write_strength[..., None]
        innovation = x.v - _read(mean, x.k)
        mean = mean + _outer(eta * x.k, innovation)
        gain = x.write_strength * _dot(x.k, x.k)
        variance = x.reset_variance * (_dot(x.q, x.q) - x.write_strength * _dot(x.k, x.q) ** 2)
        log_density = log_predictive_density(_dot(innovation, innovation),
                                             reset_innovation_variance(structure, x), x.v.shape[-1])
    else:
        p_bar = predict_covariance(structure, cov, x, stationary_cov)
        u = _matvec(p_bar, x.k)
        s = _dot(x.k, u) + 1.0 / x.precision
        gain_vector = u / s[..., None]
        innovation = x.v - _read(mean, x.k)
        mean = mean + _outer(gain_vector, innovation)
        cov = symmetrize(p_bar - _outer(u, gain_vector))
        gain = _dot(x.k, gain_vector)
        variance = _dot(x.q, _matvec(cov, x.q))
        log_density = log_predictive_density(_dot(innovation, innovation), s, x.v.shape[-1])
    y = _read(mean, x.q)
    diagnostics = Diagnostics(gain, variance, log_density) if variance is not None else None
    return y, FilterState(mean, cov), diagnostics
