"""A brute-force oracle for the exact family: condition the dense joint Gaussian of all states and values.

For one value row ``r`` the states ``s_1 .. s_T`` and observations ``v_t[r] = k_t^T s_t + e_t`` are
jointly Gaussian. We build their full covariance from the declared components (no filter code), and
read the filtered moments ``E[s_t | v_1..t]``, ``Cov[s_t | v_1..t]`` by plain Gaussian conditioning
(`filtered_moments`), and the log density of the values ``log p(v_1..t)`` from the joint density of
the observations, step by step (`log_predictive_densities`). Cost is O(T^3 K^3): small shapes only.
"""
from __future__ import annotations

import numpy as np

import designmodels as dm


def _transition(model, gates, b, t, h, key_dim):
    tr = model.transition
    if isinstance(tr, dm.Identity):
        return np.eye(key_dim)
    if isinstance(tr, dm.ScalarDecay):
        if tr.decay is not None:
            return tr.decay * np.eye(key_dim)
        if "log_decay" not in gates:
            return np.eye(key_dim)
        return np.exp(gates["log_decay"][b, t, h]) * np.eye(key_dim)
    if isinstance(tr, dm.DiagonalDecay):
        decays = tr.decays if tr.decays is not None else np.exp(gates["log_decay"][b, t, h])
        return np.diag(decays)
    return np.asarray(tr.matrix) if tr.matrix is not None else gates["transition"][b, t, h]


def _noise(model, a, gates, b, t, h, key_dim):
    noise = model.noise
    if isinstance(noise, dm.NoProcessNoise):
        return np.zeros((key_dim, key_dim))
    if isinstance(noise, dm.KeyNoise):
        raise NotImplementedError("the joint-Gaussian oracle writes Q_t from the components alone; KeyNoise's "
                                  "Q_t = q_t k_t k_t^T depends on the keys (tests/test_key_noise.py has its oracle).")
    if isinstance(noise, dm.RandomWalk):
        variance = noise.variance if noise.variance is not None else gates["process_noise"][b, t, h]
        return variance * np.eye(key_dim)
    p_s = noise.variance * np.eye(key_dim) if noise.variance is not None else \
        model.prior.covariance.array(key_dim)
    return p_s - a @ p_s @ a.T


def dynamics(model: dm.DesignModel, gates, b: int, h: int, time: int, key_dim: int):
    """The declared ``A_t`` and ``Q_t`` (``K x K`` each, ``t = 0 .. T-1``) of sequence ``b``, head ``h``:
    ``s_t = A_t s_{t-1} + w_t``, ``w_t ~ N(0, Q_t)``, from the components (no filter code)."""
    gates = {n: np.asarray(g, np.float64) for n, g in gates.items()}
    a = [_transition(model, gates, b, t, h, key_dim) for t in range(time)]
    return a, [_noise(model, a[t], gates, b, t, h, key_dim) for t in range(time)]


def observation_precisions(model: dm.DesignModel, gates, b: int, h: int, time: int):
    """``beta_t`` ``[T]`` of sequence ``b``, head ``h``: fixed, or the run-time ``beta``."""
    if isinstance(model.observation.precision, float):
        return np.full(time, model.observation.precision)
    return np.asarray(gates["beta"], np.float64)[b, :, h]


def _joint(model, k, gates, b, h, m0, p0):
    """For one sequence and head: the prior means ``E s [V, T*K]`` (one row per value row), the joint
    prior covariance of ``s_1..s_T`` ``[T*K, T*K]``, the observation matrix ``H [T, T*K]``
    (``v[r] = H s + e``) and the precisions ``beta [T]``."""
    time, key_dim = k.shape[1], k.shape[-1]
    # Joint prior of s_1..s_T: s_t = A_t s_{t-1} + w_t. Phi[t] maps s_0 to s_t; cross[t][j]
    # maps w_j to s_t.
    a, qn = dynamics(model, gates, b, h, time, key_dim)
    phi = []
    acc = np.eye(key_dim)
    for t in range(time):
        acc = a[t] @ acc
        phi.append(acc)

    def propagator(t, j):  # A_t ... A_{j+1}
        out = np.eye(key_dim)
        for i in range(j + 1, t + 1):
            out = a[i] @ out
        return out

    cov = np.zeros((time * key_dim, time * key_dim))
    for t in range(time):
        for u in range(time):
            block = phi[t] @ p0 @ phi[u].T
            for j in range(min(t, u) + 1):
                block = block + propagator(t, j) @ qn[j] @ propagator(u, j).T
            cov[t * key_dim:(t + 1) * key_dim, u * key_dim:(u + 1) * key_dim] = block
    mean = np.concatenate([m0 @ phi[t].T for t in range(time)], axis=1)  # [V, T*K]
    obs = np.zeros((time, time * key_dim))                                # H: v = H s + e
    for t in range(time):
        obs[t, t * key_dim:(t + 1) * key_dim] = k[b, t, h]
    return mean, cov, obs, observation_precisions(model, gates, b, h, time)


def _sequences(model, k, v, gates, initial_mean, initial_covariance):
    """Every (sequence, head) as ``(b, h, joint)``, `_joint` from the initial state ``(S_0, P_0)``."""
    k = np.asarray(k, np.float64)
    batch, _, heads, key_dim = k.shape
    value_dim = np.shape(v)[-1]
    for b in range(batch):
        for h in range(heads):
            m0 = np.zeros((value_dim, key_dim)) if initial_mean is None else np.asarray(initial_mean[b, h]).T
            p0 = model.prior.covariance.array(key_dim) if initial_covariance is None else initial_covariance[b, h]
            yield b, h, _joint(model, k, gates, b, h, m0, p0)


def filtered_moments(model: dm.DesignModel, q, k, v, gates, initial_mean=None, initial_covariance=None):
    """Readouts ``y [B,T,H,V]`` and the final ``(S [B,H,K,V], P [B,H,K,K])`` by joint conditioning.

    ``initial_mean`` is ``S_0 [B,H,K,V]`` (the filters' layout); inside, each value row ``r`` of the
    transpose ``S^T`` is conditioned on its own (the rows share one covariance)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    y = np.zeros((batch, time, heads, value_dim))
    final_mean = np.zeros((batch, heads, key_dim, value_dim))
    final_cov = np.zeros((batch, heads, key_dim, key_dim))
    for b, h, (mean, cov, obs, precision) in _sequences(model, k, v, gates, initial_mean, initial_covariance):
        for t in range(time):
            n = t + 1
            sl = slice(t * key_dim, (t + 1) * key_dim)
            h_obs = obs[:n]
            s_yy = h_obs @ cov @ h_obs.T + np.diag(1.0 / precision[:n])
            s_xy = cov[sl] @ h_obs.T                                          # [K, n]
            residual = v[b, :n, h].T - mean @ h_obs.T                         # [V, n]
            gain = np.linalg.solve(s_yy, s_xy.T).T                            # [K, n]
            m_t = mean[:, sl] + residual @ gain.T                             # [V, K]
            y[b, t, h] = m_t @ q[b, t, h]
            if t == time - 1:
                final_mean[b, h] = m_t.T
                final_cov[b, h] = cov[sl, sl] - gain @ s_xy.T
    return y, final_mean, final_cov


def log_predictive_densities(model: dm.DesignModel, q, k, v, gates, initial_mean=None, initial_covariance=None):
    """``log p(v_t | v_<t)`` ``[B,T,H]``, summed over the value rows, from the joint density of the
    observations: ``v_1..t[r] ~ N(H_1..t E s_r, H Cov(s) H^T + diag(1/beta))`` for each row ``r``, and
    ``log p(v_t | v_<t) = log p(v_1..t) - log p(v_1..t-1)``. Its sum over ``t`` is the marginal
    log-likelihood of the whole sequence."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, time, heads, _ = q.shape
    joint = np.zeros((batch, time + 1, heads))                  # log p(v_1..n), n = 0 .. T
    for b, h, (mean, cov, obs, precision) in _sequences(model, k, v, gates, initial_mean, initial_covariance):
        for n in range(1, time + 1):
            s_yy = obs[:n] @ cov @ obs[:n].T + np.diag(1.0 / precision[:n])
            residual = v[b, :n, h].T - mean @ obs[:n].T          # [V, n]: one row per value row
            _, logdet = np.linalg.slogdet(2 * np.pi * s_yy)
            quadratic = np.sum(residual * np.linalg.solve(s_yy, residual.T).T)
            joint[b, n, h] = -0.5 * (residual.shape[0] * logdet + quadratic)
    return np.diff(joint, axis=1)
