"""The associative lowering: ``lax.associative_scan`` over per-step elements, O(log T) depth.

Each family's recursion is written as a composition of per-step maps, and the scan composes them.
Elements carry a time axis at position 1 (``[B, T, H, ...]``); ``e_i`` is earlier than ``e_j``.

* additive: ``S_t = A_t S_{t-1} + U_t`` is the affine map ``(A_t, U_t)``, and
  ``(A_i, U_i) . (A_j, U_j) = (A_j A_i, A_j U_i + U_j)`` (log decays add for the scalar and diagonal
  kinds);
* reset (and any model whose gains are known): ``S_t = G_t S_{t-1} + B_t`` with
  ``G_t = (I - Kg_t k_t^T) A_t``, ``B_t = Kg_t v_t^T``, and ``(G_i, B_i) . (G_j, B_j) =
  (G_j G_i, G_j B_i + B_j)``;
* exact: the parallel Kalman filter of Sarkka & Garcia-Fernandez (2021), adapted to the shared
  covariance (see `exact`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from filters import kalman, linalg, shapes, transitions
from filters.inputs import FilterState, StepInputs
from filters.lowering import FilterOutput, Lowering


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _scan(combine, elements):
    return jax.lax.associative_scan(combine, elements, axis=1)


def _readout(means, q):
    """``y_t = S_t^T q_t`` for the states ``S [B,T,H,K,V]``."""
    return jnp.einsum("bthkv,bthk->bthv", means, q)


def additive(structure, x: StepInputs, state: FilterState):
    kind = structure.transition
    write = x.k if x.input_scale is None else x.k * x.input_scale[..., None]
    updates = _outer(write, x.v)                                   # U_t [B,T,H,K,V]
    if kind == "identity":
        means = state.mean[:, None] + jnp.cumsum(updates, axis=1)
    else:
        def compose(a_i, a_j):  # A_j A_i
            return a_j @ a_i if kind == "dense" else a_i + a_j

        def combine(e_i, e_j):
            (a_i, u_i), (a_j, u_j) = e_i, e_j
            return compose(a_i, a_j), transitions.apply(u_i, kind, a_j) + u_j

        cumulative, accumulated = _scan(combine, (x.transition, updates))
        means = transitions.apply(state.mean[:, None], kind, cumulative) + accumulated
    return FilterOutput(_readout(means, x.q), FilterState(means[:, -1], None))


def known_gain(structure, x: StepInputs, state: FilterState):
    """The reset family: the mean recursion is affine in ``M`` once the gains ``Kg_t = eta_t k_t`` are
    known."""
    key_dim = x.k.shape[-1]
    gain = x.write_strength[..., None] * x.k                      # Kg_t
    a = transitions.as_matrix(structure.transition, x.transition, key_dim, x.k.shape[:-1], x.k.dtype)
    eye = jnp.eye(key_dim, dtype=x.k.dtype)
    g = (eye - _outer(gain, x.k)) @ a                              # G_t = (I - Kg k^T) A_t
    b = _outer(gain, x.v)                                          # B_t = Kg v^T

    def combine(e_i, e_j):
        (g_i, b_i), (g_j, b_j) = e_i, e_j
        return g_j @ g_i, g_j @ b_i + b_j

    g_cum, b_cum = _scan(combine, (g, b))
    means = g_cum @ state.mean[:, None] + b_cum
    return FilterOutput(_readout(means, x.q), FilterState(means[:, -1], None))


def exact(structure, x: StepInputs, state: FilterState):
    """The parallel Kalman filter (Sarkka & Garcia-Fernandez 2021, Lemmas 7-8), shared covariance.

    Per value column ``r`` the state is ``s_r in R^K`` with ``s_t = A_t s_{t-1} + w``, ``w ~ N(0, Q_t)``
    and a scalar observation ``v_t[r] = k_t^T s_t + e``, ``e ~ N(0, 1/beta_t)``. Element ``t`` stores
    ``p(s_t | s_{t-1}, v_t) = N(F_t s_{t-1} + b_t, C_t)`` and the likelihood of ``v_t`` as an information
    pair ``(eta_t, J_t)`` on ``s_{t-1}``. With ``s = k^T Q k + 1/beta`` and ``g = Q k / s``::

        F = (I - g k^T) A      b = g v[r]        C = (I - g k^T) Q
        eta = A^T k v[r] / s   J = A^T k k^T A / s

    The first element absorbs the prior ``(S_0, P_0)`` (then ``F = 0``, ``J = 0``). ``F, C, J`` are
    shared by all columns; ``b`` and ``eta`` are stacked as ``K x V`` matrices ``B, N``. Composition,
    with ``W = (I + C_i J_j)^{-1}``::

        F = F_j W F_i                       C = F_j W C_i F_j^T + C_j
        B = F_j W (B_i + C_i N_j) + B_j     N = F_i^T W^T (N_j - J_j B_i) + N_i
        J = F_i^T W^T J_j F_i + J_i

    The prefix composition at ``t`` has ``B = S_t`` and ``C = P_t``: the filtered moments.
    """
    key_dim = x.k.shape[-1]
    dtype = x.k.dtype
    lead = x.k.shape[:-1]
    eye = jnp.eye(key_dim, dtype=dtype)
    a = transitions.as_matrix(structure.transition, x.transition, key_dim, lead, dtype)
    stationary = structure.stationary_covariance(key_dim)
    if structure.noise == "stationary":
        p_s = jnp.asarray(stationary, dtype)
        noise = p_s - a @ p_s @ _mT(a)
    elif structure.noise == "random_walk":
        noise = x.process_noise[..., None, None] * eye
    elif structure.noise == "key":                                  # Q_t = q_t k_t k_t^T
        noise = x.process_noise[..., None, None] * _outer(x.k, x.k)
    else:
        noise = jnp.zeros((*lead, key_dim, key_dim), dtype)

    k, v = x.k, x.v
    inv_precision = 1.0 / x.precision
    a_t_k = jnp.einsum("...jk,...j->...k", a, k)                     # A^T k
    qk = jnp.einsum("...ij,...j->...i", noise, k)
    innovation = jnp.sum(k * qk, -1) + inv_precision               # S
    g = qk / innovation[..., None]
    residual = eye - _outer(g, k)
    f = residual @ a
    b = _outer(g, v)
    c = kalman.symmetrize(residual @ noise)
    n = _outer(a_t_k, v) / innovation[..., None, None]
    j = _outer(a_t_k, a_t_k) / innovation[..., None, None]

    # The first element absorbs the prior: p(s_1 | v_1) with s_0 ~ N(S_0 column, P_0).
    x0 = jax.tree_util.tree_map(lambda z: z[:, 0], x)
    _, first, _ = kalman.step(structure, state, x0,
                              None if stationary is None else jnp.asarray(stationary, dtype))
    f = f.at[:, 0].set(0.0)
    b = b.at[:, 0].set(first.mean)
    c = c.at[:, 0].set(first.covariance)
    n = n.at[:, 0].set(0.0)
    j = j.at[:, 0].set(0.0)

    def combine(e_i, e_j):
        f_i, b_i, c_i, n_i, j_i = e_i
        f_j, b_j, c_j, n_j, j_j = e_j
        w = linalg.inverse(eye + c_i @ j_j)
        f_jw = f_j @ w
        return (
            f_jw @ f_i,
            f_jw @ (b_i + c_i @ n_j) + b_j,
            kalman.symmetrize(f_jw @ c_i @ _mT(f_j) + c_j),
            _mT(f_i) @ _mT(w) @ (n_j - j_j @ b_i) + n_i,
            kalman.symmetrize(_mT(f_i) @ _mT(w) @ j_j @ f_i + j_i),
        )

    _, means, covariances, _, _ = _scan(combine, (f, b, c, n, j))
    return FilterOutput(_readout(means, x.q), FilterState(means[:, -1], covariances[:, -1]))


@shapes.typed
def run(structure, x: StepInputs, state: FilterState) -> FilterOutput:
    lowering = {"additive": additive, "reset": known_gain, "exact": exact}[structure.family]
    return lowering(structure, x.in_compute_dtype(), state)


class Associative(Lowering):
    name = "associative"
    summary = ("lax.associative_scan; O(log T) depth; additive: affine elements (A_t, U_t); reset: "
               "matrix-affine elements (G_t, B_t), O(T K^3); exact: Sarkka & Garcia-Fernandez elements, "
               "O(T K^3) with a K x K solve per composition")

    def reason_not_applicable(self, structure):
        return None                                  # every design model

    def run(self, structure, x, state, *, diagnostics):
        return run(structure, x, state)               # no per-step diagnostics (supports_diagnostics)


LOWERING = Associative()
