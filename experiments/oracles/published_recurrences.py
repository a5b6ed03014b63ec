"""Independent reference implementations ("oracles") of published recurrent sequence layers.

These functions exist only to serve as independent oracles for the unification proof: each one is
written directly from its paper's own equations, in the paper's own state layout, using nothing but
``jax`` / ``jax.numpy`` (nothing is imported from the project).  They are deliberately naive -- a
``jax.lax.scan`` over time, or a dense T x T "attention" form -- so that they can be checked
against the papers by eye.

References
----------
* Katharopoulos, Vyas, Pappas, Fleuret (2020). "Transformers are RNNs: Fast Autoregressive
  Transformers with Linear Attention." ICML 2020.  (S_i = S_{i-1} + phi(K_i) V_i^T,
  V'_i = phi(Q_i)^T S_i / phi(Q_i)^T Z_i.)
* Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei (2023). "Retentive Network: A Successor to Transformer
  for Large Language Models." arXiv:2307.08621.  (Recurrent S_n = gamma S_{n-1} + K_n^T V_n,
  o_n = Q_n S_n; parallel (Q K^T . D) V with D_nm = gamma^{n-m} [n >= m].)
* Yang, Wang, Shen, Panda, Kim (2024). "Gated Linear Attention Transformers with
  Hardware-Efficient Training." ICML 2024.  (S_t = (alpha_t^T 1) . S_{t-1} + k_t^T v_t,
  o_t = q_t S_t.)
* Dao, Gu (2024). "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
  Structured State Space Duality." ICML 2024.  (Mamba-2 / SSD: h_t = A_t h_{t-1} + B_t x_t,
  y_t = C_t^T h_t with scalar A_t = exp(dt_t A); quadratic dual y = (L . C B^T) x.)
* Schlag, Irie, Schmidhuber (2021). "Linear Transformers Are Secretly Fast Weight Programmers."
  ICML 2021.  (Delta-rule fast-weight update.)
* Yang, Wang, Zhang, Shen, Kim (2024). "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length." NeurIPS 2024.  (S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T.)
* Yang, Kautz, Hatamizadeh (2025). "Gated Delta Networks: Improving Mamba2 with Delta Rule."
  ICLR 2025.  (S_t = S_{t-1}(alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T.)
* Liu, Wang, Wu, Feng, Stone, Liu (2024). "Longhorn: State Space Models are Amortized Online
  Learners." arXiv:2407.14207.  (Closed-form solution of the implicit online-regression objective.)

Common convention (all functions)
---------------------------------
Inputs are laid out [B, T, H, D] (batch, time, heads, feature): q, k are [B, T, H, K], v is
[B, T, H, V], per-head gates are [B, T, H] (GLA's gate is [B, T, H, K]).  Every recurrent function
takes an optional ``initial_state`` and returns ``(o, final_state)`` with o of shape [B, T, H, V].
BOTH ``initial_state`` and ``final_state`` are in the common layout S of shape [B, H, K, V]
(key x value, flash-linear-attention's layout and the filters'), for which the readout is
o_t = S_t^T q_t.  Internally each function converts to the layout of its paper and converts back.
``initial_state=None`` means zeros.

The computation dtype is the promoted dtype of all array inputs (including ``initial_state``); no
input is ever cast down.  The ``*_parallel`` functions assume a zero initial state and return only o.
The numerical cores are wrapped in ``jax.jit`` only so that tests compile once per shape rather
than once per primitive; scalars such as RetNet's gamma are traced, not static.
"""

import jax
import jax.numpy as jnp


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _dtype(*arrays):
    """Promoted dtype of the given inputs; never narrower than any of them."""
    return jnp.result_type(*arrays)


def _cast(dtype, *arrays):
    return tuple(jnp.asarray(a).astype(dtype) for a in arrays)


def _state0(initial_state, q, v, *arrays):
    """Initial state in the common [B, H, K, V] layout; zeros (of the promoted dtype) when None."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), _dtype(*arrays))
    m = jnp.asarray(initial_state)
    if m.shape != (b, h, dk, dv):
        raise ValueError(f"initial_state must have the common layout [B,H,K,V] = {(b, h, dk, dv)}, got {m.shape}")
    return m


def _kv_to_vk(s):
    """Common layout S [.., K, V] -> the value-by-key layout M [.., V, K] of some papers (M = S^T, so
    o = M q = S^T q)."""
    return jnp.swapaxes(s, -1, -2)


_vk_to_kv = _kv_to_vk  # the transpose is its own inverse


def _scan(step, state, xs):
    """Run ``state, o_t = step(state, x_t)`` over time; xs are [B, T, ...]; returns (o [B, T, ...], state)."""
    state, o = jax.lax.scan(step, state, tuple(jnp.moveaxis(a, 1, 0) for a in xs))
    return jnp.moveaxis(o, 0, 1), state


def _causal_mask(t):
    return jnp.tril(jnp.ones((t, t), dtype=bool))


def _decay_matrix(log_decay):
    """Per-(batch, head) decay matrix D[t, s] = exp(sum_{r=s+1..t} log_decay_r) for s <= t, else 0.

    log_decay: [B, T, H] -> D: [B, H, T, T].  Built from cumulative log decays, cum_t - cum_s; the
    causal mask is applied in log space (-inf) so no exp of a positive exponent is ever taken.
    """
    t = log_decay.shape[1]
    c = jnp.cumsum(jnp.moveaxis(log_decay, 1, -1), axis=-1)  # [B, H, T]
    diff = c[..., :, None] - c[..., None, :]  # [B, H, T(t), T(s)]
    return jnp.exp(jnp.where(_causal_mask(t), diff, -jnp.inf))


# ---------------------------------------------------------------------------------------------
# 1. Linear attention (Katharopoulos et al. 2020)
# ---------------------------------------------------------------------------------------------

def linear_attention(q, k, v, initial_state=None):
    """Causal linear attention, recurrent form, identity feature map and no normaliser.

    Paper (Katharopoulos et al. 2020, with phi = identity and the denominator Z dropped):
        S_i = S_{i-1} + K_i V_i^T          (S_i is [K, V]; K_i, V_i column vectors)
        o_i = Q_i^T S_i
    The paper's [K, V] layout is the common layout.

    q, k: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None.
    Returns o [B, T, H, V] and the final state [B, H, K, V].
    """
    return _linear_attention(_state0(initial_state, q, v, q, k, v), q, k, v)


@jax.jit
def _linear_attention(S0, q, k, v):
    S0, q, k, v = _cast(_dtype(S0, q, k, v), S0, q, k, v)

    def step(S, x):  # S: paper layout [B, H, K, V]
        q_i, k_i, v_i = x
        S = S + jnp.einsum("bhk,bhv->bhkv", k_i, v_i)  # S_i = S_{i-1} + K_i V_i^T
        return S, jnp.einsum("bhk,bhkv->bhv", q_i, S)  # o_i = Q_i^T S_i

    return _scan(step, S0, (q, k, v))


@jax.jit
def linear_attention_parallel(q, k, v):
    """Causal linear attention, quadratic form (zero initial state):
        o_i = sum_{j <= i} (Q_i^T K_j) V_j,   i.e.  O = tril(Q K^T) V.
    """
    q, k, v = _cast(_dtype(q, k, v), q, k, v)
    scores = jnp.einsum("bthk,bshk->bhts", q, k)
    scores = jnp.where(_causal_mask(q.shape[1]), scores, 0)
    return jnp.einsum("bhts,bshv->bthv", scores, v)


# ---------------------------------------------------------------------------------------------
# 2. RetNet (Sun et al. 2023)
# ---------------------------------------------------------------------------------------------

def retnet(q, k, v, gamma, initial_state=None):
    """Retention, recurrent form (Sun et al. 2023; no xPos rotation, no scaling, no GroupNorm):
        S_n = gamma S_{n-1} + K_n^T V_n     (K_n, V_n row vectors; S_n is [K, V])
        o_n = Q_n S_n
    gamma: python float in (0, 1], shared by all heads.
    The paper's [K, V] layout is the common layout.
    """
    return _retnet(_state0(initial_state, q, v, q, k, v), q, k, v, gamma)


@jax.jit
def _retnet(S0, q, k, v, gamma):
    S0, q, k, v = _cast(_dtype(S0, q, k, v), S0, q, k, v)

    def step(S, x):  # S: paper layout [B, H, K, V]
        q_n, k_n, v_n = x
        S = gamma * S + jnp.einsum("bhk,bhv->bhkv", k_n, v_n)  # S_n = gamma S_{n-1} + K_n^T V_n
        return S, jnp.einsum("bhk,bhkv->bhv", q_n, S)  # o_n = Q_n S_n

    return _scan(step, S0, (q, k, v))


@jax.jit
def retnet_parallel(q, k, v, gamma):
    """Retention, parallel form (Sun et al. 2023), zero initial state:
        D_nm = gamma^(n-m) if n >= m else 0,     O = (Q K^T . D) V.
    """
    dtype = _dtype(q, k, v)
    q, k, v = _cast(dtype, q, k, v)
    t = q.shape[1]
    n = jnp.arange(t)
    expo = jnp.maximum(n[:, None] - n[None, :], 0).astype(dtype)
    D = jnp.where(_causal_mask(t), jnp.asarray(gamma, dtype) ** expo, 0)  # [T, T]
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * D
    return jnp.einsum("bhts,bshv->bthv", scores, v)


# ---------------------------------------------------------------------------------------------
# 3. Gated Linear Attention (Yang et al. 2024)
# ---------------------------------------------------------------------------------------------

def gla(q, k, v, log_decay, initial_state=None):
    """Gated linear attention, recurrent form (Yang et al. 2024; no normaliser, no output gate):
        alpha_t = exp(log_decay_t)                     ([K] per head)
        S_t = (alpha_t^T 1) . S_{t-1} + k_t^T v_t = diag(alpha_t) S_{t-1} + k_t^T v_t
        o_t = q_t S_t                                  (S_t is [K, V]; q_t, k_t, v_t row vectors)
    log_decay: [B, T, H, K] (<= 0 for a decay).
    The paper's [K, V] layout is the common layout.
    """
    return _gla(_state0(initial_state, q, v, q, k, v, log_decay), q, k, v, log_decay)


@jax.jit
def _gla(S0, q, k, v, log_decay):
    S0, q, k, v, log_decay = _cast(_dtype(S0, q, k, v, log_decay), S0, q, k, v, log_decay)

    def step(S, x):  # S: paper layout [B, H, K, V]
        q_t, k_t, v_t, a_t = x
        S = a_t[..., :, None] * S + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)  # diag(alpha_t) S_{t-1} + k_t^T v_t
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S)  # o_t = q_t S_t

    return _scan(step, S0, (q, k, v, jnp.exp(log_decay)))


@jax.jit
def gla_parallel(q, k, v, log_decay):
    """Gated linear attention, quadratic form (Yang et al. 2024, parallel form with
    b_t = prod_{j<=t} alpha_j), zero initial state:
        o_t = sum_{s <= t} ( (q_t . exp(cumlog_t - cumlog_s)) k_s^T ) v_s,
    with cumlog_t = sum_{j <= t} log_decay_j ([K]); the ratio b_t / b_s is formed in log space.
    """
    q, k, v, log_decay = _cast(_dtype(q, k, v, log_decay), q, k, v, log_decay)
    t = q.shape[1]
    c = jnp.cumsum(log_decay, axis=1)  # [B, T, H, K]
    diff = c[:, :, None] - c[:, None, :]  # [B, T(t), T(s), H, K]
    decay = jnp.exp(jnp.where(_causal_mask(t)[None, :, :, None, None], diff, -jnp.inf))
    scores = jnp.einsum("bthk,btshk,bshk->bhts", q, decay, k)
    return jnp.einsum("bhts,bshv->bthv", scores, v)


# ---------------------------------------------------------------------------------------------
# 4. Mamba-2 / SSD (Dao & Gu 2024)
# ---------------------------------------------------------------------------------------------

def mamba2(C, B, x, log_decay, dt, initial_state=None):
    """Mamba-2 SSD recurrence, A = scalar x identity per head (Dao & Gu 2024; no D skip connection,
    no z gating, no short convolution):
        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     (h_t is [P, N] = [headdim, d_state])
        y_t = h_t C_t
    log_decay = dt_t * A, precomputed, [B, T, H]; dt: [B, T, H] > 0.
    C, B: [B, T, H, N] (the roles of q, k); x: [B, T, H, P] (the role of v).
    The paper / reference-code state layout is [P, N] = [V, K]: the common [K, V] layout transposed.
    """
    return _mamba2(_state0(initial_state, C, x, C, B, x, log_decay, dt), C, B, x, log_decay, dt)


@jax.jit
def _mamba2(h0, C, B, x, log_decay, dt):
    h0, C, B, x, log_decay, dt = _cast(_dtype(h0, C, B, x, log_decay, dt), h0, C, B, x, log_decay, dt)

    def step(h, inp):  # h: [B, H, P, N]
        C_t, B_t, x_t, a_t, dt_t = inp
        h = (a_t[..., None, None] * h  # exp(dt_t A) h_{t-1}
             + dt_t[..., None, None] * jnp.einsum("bhp,bhn->bhpn", x_t, B_t))  # + dt_t x_t B_t^T
        return h, jnp.einsum("bhpn,bhn->bhp", h, C_t)  # y_t = h_t C_t

    y, h = _scan(step, _kv_to_vk(h0), (C, B, x, jnp.exp(log_decay), dt))
    return y, _vk_to_kv(h)


@jax.jit
def mamba2_parallel(C, B, x, log_decay, dt):
    """SSD quadratic ("masked attention") dual form (Dao & Gu 2024), zero initial state:
        L_ts = exp(sum_{r=s+1..t} dt_r A) for s <= t else 0   (1-semiseparable mask),
        y = (L . C B^T) (dt x),   i.e.  y_t = sum_{s<=t} L_ts (C_t^T B_s) dt_s x_s.
    """
    C, B, x, log_decay, dt = _cast(_dtype(C, B, x, log_decay, dt), C, B, x, log_decay, dt)
    L = _decay_matrix(log_decay)  # [B, H, T, T]
    scores = jnp.einsum("bthn,bshn->bhts", C, B) * L
    return jnp.einsum("bhts,bshp->bthp", scores, dt[..., None] * x)


# ---------------------------------------------------------------------------------------------
# 5. DeltaNet (Schlag et al. 2021; Yang et al. 2024)
# ---------------------------------------------------------------------------------------------

def deltanet(q, k, v, beta, initial_state=None):
    """Delta rule (Schlag et al. 2021), in the form of Yang et al. 2024:
        S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T      (S_t is [V, K])
        o_t = S_t q_t
    beta: [B, T, H] in (0, 1).  The paper's [V, K] layout is the common [K, V] layout transposed.
    (Expanded: S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T.)
    """
    return _deltanet(_state0(initial_state, q, v, q, k, v, beta), q, k, v, beta)


@jax.jit
def _deltanet(S0, q, k, v, beta):
    S0, q, k, v, beta = _cast(_dtype(S0, q, k, v, beta), S0, q, k, v, beta)
    eye = jnp.eye(S0.shape[-2], dtype=S0.dtype)                 # K x K; S0 is [B, H, K, V]

    def step(S, x):  # S: [B, H, V, K]
        q_t, k_t, v_t, b_t = x
        b_t = b_t[..., None, None]
        erase = eye - b_t * jnp.einsum("bhi,bhj->bhij", k_t, k_t)  # I - beta_t k_t k_t^T
        S = S @ erase + b_t * jnp.einsum("bhv,bhk->bhvk", v_t, k_t)  # + beta_t v_t k_t^T
        return S, jnp.einsum("bhvk,bhk->bhv", S, q_t)  # o_t = S_t q_t

    o, S = _scan(step, _kv_to_vk(S0), (q, k, v, beta))
    return o, _vk_to_kv(S)


# ---------------------------------------------------------------------------------------------
# 6. Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025)
# ---------------------------------------------------------------------------------------------

def gated_deltanet(q, k, v, log_decay, beta, initial_state=None):
    """Gated delta rule (Yang, Kautz, Hatamizadeh 2025):
        alpha_t = exp(log_decay_t)   ([B, T, H], scalar per head)
        S_t = S_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T     (S_t is [V, K])
        o_t = S_t q_t
    The paper's [V, K] layout is the common [K, V] layout transposed.
    """
    return _gated_deltanet(_state0(initial_state, q, v, q, k, v, log_decay, beta), q, k, v, log_decay, beta)


@jax.jit
def _gated_deltanet(S0, q, k, v, log_decay, beta):
    S0, q, k, v, log_decay, beta = _cast(_dtype(S0, q, k, v, log_decay, beta), S0, q, k, v, log_decay, beta)
    eye = jnp.eye(S0.shape[-2], dtype=S0.dtype)                 # K x K; S0 is [B, H, K, V]

    def step(S, x):  # S: [B, H, V, K]
        q_t, k_t, v_t, a_t, b_t = x
        a_t, b_t = a_t[..., None, None], b_t[..., None, None]
        transition = a_t * (eye - b_t * jnp.einsum("bhi,bhj->bhij", k_t, k_t))  # alpha_t (I - beta_t k_t k_t^T)
        S = S @ transition + b_t * jnp.einsum("bhv,bhk->bhvk", v_t, k_t)  # + beta_t v_t k_t^T
        return S, jnp.einsum("bhvk,bhk->bhv", S, q_t)  # o_t = S_t q_t

    o, S = _scan(step, _kv_to_vk(S0), (q, k, v, jnp.exp(log_decay), beta))
    return o, _vk_to_kv(S)


# ---------------------------------------------------------------------------------------------
# 7. Longhorn (Liu et al. 2024), exact closed-form online-regression update
# ---------------------------------------------------------------------------------------------

def longhorn(q, k, v, beta, initial_state=None):
    """Longhorn, exact closed-form implicit online-learning update (Liu et al. 2024).

    Each value channel i solves the implicit online regression
        s_t^i = argmin_s  ||s - s_{t-1}^i||^2 + beta_t (s^T k_t - v_t^i)^2 ,
    whose closed form (Sherman-Morrison) is, stacking the channels as the rows of S ([V, K]):
        eps_t = beta_t / (1 + beta_t k_t^T k_t)
        S_t = S_{t-1} (I - eps_t k_t k_t^T) + eps_t v_t k_t^T
        o_t = S_t q_t
    beta: [B, T, H] > 0, one step size per head (the paper allows one per value channel, which
    would give one eps per row of S -- not needed here).  [V, K] is the common [K, V] layout transposed.

    NOTE: the released Longhorn kernel replaces the erase term (I - eps_t k_t k_t^T) by a diagonal
    approximation, S_t = S_{t-1} . (1 - eps_t (k_t . k_t)^T) + eps_t v_t k_t^T (elementwise), which
    is a *different* recurrence.  This function computes the exact full-matrix update above, NOT
    the released kernel.
    """
    return _longhorn(_state0(initial_state, q, v, q, k, v, beta), q, k, v, beta)


@jax.jit
def _longhorn(S0, q, k, v, beta):
    S0, q, k, v, beta = _cast(_dtype(S0, q, k, v, beta), S0, q, k, v, beta)
    eye = jnp.eye(S0.shape[-2], dtype=S0.dtype)                 # K x K; S0 is [B, H, K, V]

    def step(S, x):  # S: [B, H, V, K]
        q_t, k_t, v_t, beta_t = x
        eps = beta_t / (1 + beta_t * jnp.sum(k_t * k_t, axis=-1))  # eps_t = beta_t / (1 + beta_t k_t^T k_t)
        e = eps[..., None, None]
        S = S @ (eye - e * jnp.einsum("bhi,bhj->bhij", k_t, k_t)) + e * jnp.einsum("bhv,bhk->bhvk", v_t, k_t)
        return S, jnp.einsum("bhvk,bhk->bhv", S, q_t)  # o_t = S_t q_t

    o, S = _scan(step, _kv_to_vk(S0), (q, k, v, beta))
    return o, _vk_to_kv(S)
