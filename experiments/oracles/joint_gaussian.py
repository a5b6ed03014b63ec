"""A brute-force oracle for the exact family: condition the dense joint Gaussian of all states and values.

For one value row ``r`` the states ``s_1 .. s_T`` and observations ``v_t[r] = k_t^T s_t + e_t`` are
jointly Gaussian. We build their full covariance from the declared components (no filter code), and
read the filtered moments ``E[s_t | v_1..t]``, ``Cov[s_t | v_1..t]`` by plain Gaussian conditioning.
Cost is O(T^3 K^3): small shapes only.
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
    if isinstance(noise, dm.RandomWalk):
        variance = noise.variance if noise.variance is not None else gates["process_noise"][b, t, h]
        return variance * np.eye(key_dim)
    p_s = noise.variance * np.eye(key_dim) if noise.variance is not None else \
        model.prior.covariance.array(key_dim)
    return p_s - a @ p_s @ a.T


def filtered_moments(model: dm.DesignModel, q, k, v, gates, initial_mean=None, initial_covariance=None):
    """Readouts ``y [B,T,H,V]`` and the final ``(S [B,H,K,V], P [B,H,K,K])`` by joint conditioning.

    ``initial_mean`` is ``S_0 [B,H,K,V]`` (the filters' layout); inside, each value row ``r`` of the
    transpose ``S^T`` is conditioned on its own (the rows share one covariance)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    gates = {n: np.asarray(g, np.float64) for n, g in gates.items()}
    batch, time, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    y = np.zeros((batch, time, heads, value_dim))
    final_mean = np.zeros((batch, heads, key_dim, value_dim))
    final_cov = np.zeros((batch, heads, key_dim, key_dim))
    for b in range(batch):
        for h in range(heads):
            m0 = np.zeros((value_dim, key_dim)) if initial_mean is None else np.asarray(initial_mean[b, h]).T
            p0 = model.prior.covariance.array(key_dim) if initial_covariance is None else initial_covariance[b, h]
            # Joint prior of s_1..s_T: s_t = A_t s_{t-1} + w_t. Phi[t] maps s_0 to s_t; cross[t][j]
            # maps w_j to s_t.
            a = [_transition(model, gates, b, t, h, key_dim) for t in range(time)]
            qn = [_noise(model, a[t], gates, b, t, h, key_dim) for t in range(time)]
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
            if isinstance(model.observation.precision, float):
                precision = np.full(time, model.observation.precision)
            else:
                precision = gates["beta"][b, :, h]
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
