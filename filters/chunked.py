"""The chunked lowering: the matmul-heavy forms of fast kernels, in pure JAX, and the references of the
fused kernels (`additive`, `delta_rule`, `covariance_pass`: a Pallas kernel has the same signature).

The sequence is cut into chunks of ``C`` steps. The mathematics below is written, and coded, for **one
chunk of one head** (a ``[C, K]`` block of keys, the state ``S [K, V]``), in the symbols of this
docstring; ``jax.vmap`` batches it over every chunk and head. Inside a chunk everything is ``C x C``
masked products and one triangular solve, for all chunks at once (the terms that do not read the state,
one NamedTuple per family); between chunks a ``lax.scan`` passes the state (``S``, and ``P`` for the
exact family) through the few products that read it. Chunk bodies are rematerialized in the backward
pass (``jax.checkpoint``), so reverse mode stores only chunk-boundary states: memory is linear in ``T``.

Notation inside a chunk (steps ``i, j = 1..C``; rows of ``Q, K, W [C, K]`` and ``V [C, V]`` are the
steps): ``b_i = sum_{m<=i} log a_m`` (per channel for a diagonal transition, ``[C, K]``; else ``[C, 1]``),
so ``gamma_i = exp(b_i)`` is the decay since the chunk start and ``exp(b_i - b_j) <= 1`` for ``j <= i``
the decay between two steps: every exponent taken is non-positive. ``X * gamma`` scales row ``i`` of
``X`` by ``gamma_i``.

**Additive** (SSD / GLA), ``S_i = A_i S_{i-1} + k_i v_i^T`` (`AdditiveChunk`)::

    Y   = (Q * gamma) S_0 + [(q_i . k_j decayed by exp(b_i - b_j))]_{j<=i} V
    S_C = gamma_C * S_0 + (K * exp(b_C - b))^T V

**Generalized delta rule**, ``S_i = A_i S_{i-1} + w_i (v_i - (A_i S_{i-1})^T k_i)^T`` (erase key ``k``,
write key ``w``; the reset family has ``w = eta k``, the exact family ``w = Kg``) (`DeltaChunk`): with
the innovations ``u_i = v_i - (A_i S_{i-1})^T k_i``, ``S_i = A_i S_{i-1} + w_i u_i^T``, and unrolling
gives the UT transform::

    (I + L) U = V - (K * gamma) S_0,     L_ij = sum_c k_ic w_jc exp(b_ic - b_jc)   (j < i)
    Y   = (Q * gamma) S_0 + Att U,       Att_ij = sum_c q_ic w_jc exp(b_ic - b_jc) (j <= i)
    S_C = gamma_C * S_0 + (W * exp(b_C - b))^T U

``T = (I + L)^{-1}`` does not read ``S_0``: ``T V`` and ``T (K * gamma)`` are computed for all chunks in
parallel, and the scan does only the ``C x K x V`` products that read ``S_0``.

**Exact** (scalar or no decay, isotropic noise ``Q_t = q_t I``) (`CovarianceChunk`): the covariance
recursion never sees the values. Inside a chunk starting from ``P_c``, the observations
``y_i = k_i^T s_i + e_i`` of one value column are jointly Gaussian with covariance::

    Sigma = (G P_c G^T) + N,     G = K * gamma,     N = (R * alpha_min) * (K K^T) + diag(1 / beta)

where ``R_ij = exp(-|b_i - b_j|)``, ``alpha_i = a_i^2 alpha_{i-1} + q_i`` (``alpha_0 = 0``) is the noise
accumulated since the chunk start and ``alpha_min = alpha_{min(i, j)}``. Conditioning on the
observations one by one is the Cholesky factorization ``Sigma = L L^T``: with ``X = L^{-1}`` the whitened
innovations are ``eps = X (y - E y)``, and since ``Cov(s_i, y_m) = gamma_i gamma_m P_c k_m + R_im alpha_m
k_m`` for ``m <= i``::

    Gw   = X G                                                            (whitened decayed keys)
    Kg_i = [gamma_i (Gw P_c)_i + sum_{m<=i} X_im R_im alpha_m k_m] / L_ii   (the gains, all at once)
    Z    = gamma_C Gw P_c + X (K * R_C. alpha)                              (Cov(s_C, eps))
    P_C  = gamma_C^2 P_c + alpha_C I - Z^T Z                                (a rank-C update)

and the predictive variance ``q_i^T P_i q_i = gamma_i^2 q_i^T P_c q_i + alpha_i |q_i|^2 - sum_{j<=i} E_ij^2``
with ``E = diag(gamma) Q P_c Gw^T + F X^T``, ``F_im = R_im alpha_m q_i . k_m`` (``m <= i``). The mean
pass is then the generalized delta rule above with ``w = Kg``.

**Exact with process noise along the key** (``Q_t = q_t k_t k_t^T``, `designmodels.KeyNoise`): the noise
added at step ``m`` lies along ``k_m``, so with ``Rg = R * (K K^T)`` (``Rg_im = R_im k_i . k_m``, ``m <= i``)
the same conditioning holds with::

    Sigma = G P_c G^T + Rg diag(q) Rg^T + diag(1 / beta)
    Kg_i  = [gamma_i (Gw P_c)_i + sum_m q_m R_im (X Rg)_im k_m] / L_ii
    Z     = gamma_C Gw P_c + X Rg (K * q R_C.)
    P_C   = gamma_C^2 P_c + K^T diag(q R_C.^2) K - Z^T Z

(``Cov(s_i, y_j) = gamma_i gamma_j P_c k_j + sum_{m <= j} R_im R_jm q_m (k_m . k_j) k_m``), and in the
predictive variance ``alpha_i |q_i|^2`` becomes ``sum_m R_im^2 q_m (q_i . k_m)^2`` and ``F = (R * (Q K^T)
diag(q)) Rg^T``.

**The likelihood** (diagnostics): ``L_ii^2`` is the variance of ``y_i`` given every earlier observation,
i.e. the innovation variance ``s_i = k_i^T P_bar_i k_i + 1/beta_i``, and the mean pass's ``U`` holds the
innovations ``u_i = v_i - (A_i S_{i-1})^T k_i``; so ``log p(v_i | v_<i) = -1/2 (V log(2 pi s_i) +
|u_i|^2 / s_i)`` costs one extra ``[C]`` output of each pass (`filters.kalman.log_predictive_density`),
and nothing when diagnostics are off.

Precision: the inputs may be any float dtype; everything here runs in float32 (float64 with x64 inputs),
with full-float32 matrix products, including covariances, Gram matrices and factorizations.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from filters import kalman, linalg, shapes
from filters.inputs import FilterState, StepInputs, compute_dtype
from filters.lowering import BackendError, FilterOutput, Lowering

DEFAULT_CHUNK_SIZE = 64


# ----------------------------------------------------------------------------------------------------
# Layout: [B, T, H, ...] <-> chunks [N, B*H, C, ...] (N chunks of C steps, every head of every sequence);
# the padding steps change nothing.


def _to_chunks(x, chunk: int, pad_value=0.0):
    """``[B, T, H, ...] -> [N, B*H, C, ...]``, ``T`` padded to ``N C`` with ``pad_value``."""
    batch, time, heads = x.shape[:3]
    n = -(-time // chunk)
    if n * chunk != time:
        x = jnp.pad(x, [(0, 0), (0, n * chunk - time)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    x = jnp.moveaxis(x.reshape(batch, n, chunk, heads, *x.shape[3:]), (1, 3), (0, 2))   # [N, B, H, C, ...]
    return x.reshape(n, batch * heads, chunk, *x.shape[4:])


def _from_chunks(x, batch: int, heads: int, time: int):
    """``[N, B*H, C, ...] -> [B, T, H, ...]``."""
    n, _, chunk = x.shape[:3]
    x = x.reshape(n, batch, heads, chunk, *x.shape[3:])   # heads named: B = 0 leaves no -1 to infer
    x = jnp.moveaxis(x, (0, 2), (1, 3))                                  # [B, N, C, H, ...]
    return x.reshape(batch, n * chunk, *x.shape[3:])[:, :time]


def _every_chunk(fn, *chunks):
    """``fn`` of one chunk and head, on every chunk and head (``[N, B*H, ...]`` arguments and results)."""
    lead = jax.tree_util.tree_leaves(chunks)[0].shape[:2]
    flat = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), chunks)
    out = jax.vmap(fn)(*flat)
    return jax.tree_util.tree_map(lambda a: a.reshape(*lead, *a.shape[1:]), out)


def _through_chunks(step, state, terms):
    """The state ``[B*H, ...]`` through the chunks in order: ``state, y = step(state, terms)`` for one
    chunk and head, on every head, ``lax.scan`` over the chunks; rematerialized in the backward pass."""
    return jax.lax.scan(jax.checkpoint(jax.vmap(step), prevent_cse=False), state, terms)


def _heads(state):
    """``[B, H, ...] -> [B*H, ...]``."""
    return state.reshape(-1, *state.shape[2:])


def _cumulative_log_decay(log_decay, chunk: int, dtype):
    """``b [C, 1]`` (no or scalar decay) or ``[C, K]`` (diagonal) for one chunk."""
    if log_decay is None:
        # b = 0, written as such: a cumsum of zeros is a constant that XLA folds element by element at
        # compile time (seconds per layer on the GPU at batch 256)
        return jnp.zeros((chunk, 1), dtype)
    log_decay = log_decay[:, None] if log_decay.ndim == 1 else log_decay
    return jnp.cumsum(log_decay, axis=0)


# ----------------------------------------------------------------------------------------------------
# Pairwise decayed products.

_BASE_BLOCK = 4   # the channel-wise pairwise product recurses down to diagonal blocks of this size
_PAD_MULTIPLE = 8


def _pairwise_dense(x, y, b, strict):
    """``_pairwise`` from the full ``[..., C, C, 1 or K]`` decay tensor."""
    chunk = x.shape[-2]
    mask = jnp.tril(jnp.ones((chunk, chunk), bool), -1 if strict else 0)
    diff = b[..., :, None, :] - b[..., None, :, :]                     # [..., C, C, 1 or K]
    decay = jnp.exp(jnp.where(mask[..., None], diff, -jnp.inf))
    if b.shape[-1] == 1:
        return (x @ jnp.swapaxes(y, -1, -2)) * decay[..., 0]
    return jnp.einsum("...ijc,...jc->...ij", x[..., :, None, :] * decay, y)


def _pairwise_bisect(x, y, b, strict):
    """``_pairwise`` on blocks ``x, y, b [..., m, h, K] -> [..., m, h, h]``, by halving ``h``.

    With ``r = b_{h/2}`` (the last row of the first half) the lower-left quadrant is
    ``(x_2 * exp(b_2 - r)) (y_1 * exp(r - b_1))^T`` (both exponents <= 0: ``b`` is non-increasing);
    the two diagonal quadrants recurse, all blocks of one level in one batch.
    """
    h = x.shape[-2]
    if h <= _BASE_BLOCK or h % 2:
        return _pairwise_dense(x, y, b, strict)
    half = h // 2
    halves = lambda z: z.reshape(*z.shape[:-3], 2 * z.shape[-3], half, z.shape[-1])
    inner = _pairwise_bisect(halves(x), halves(y), halves(b), strict)    # [..., 2m, h/2, h/2]
    inner = inner.reshape(*inner.shape[:-3], -1, 2, half, half)
    ref = b[..., half - 1:half, :]
    x_decayed = x[..., half:, :] * jnp.exp(b[..., half:, :] - ref)
    y_decayed = y[..., :half, :] * jnp.exp(ref - b[..., :half, :])
    lower = x_decayed @ jnp.swapaxes(y_decayed, -1, -2)                  # [..., m, h/2, h/2]
    top = jnp.concatenate([inner[..., 0, :, :], jnp.zeros_like(lower)], -1)
    bottom = jnp.concatenate([lower, inner[..., 1, :, :]], -1)
    return jnp.concatenate([top, bottom], -2)


def _pairwise_channels(x, y, b, strict):
    """``_pairwise`` for a channel-wise ``b [..., C, K]`` without a ``[C, C, K]`` tensor: recursive
    halving (``_pairwise_bisect``), so the off-diagonal blocks are matmuls of decayed ``x`` and ``y`` and
    only ``[4, 4, K]`` diagonal blocks are formed. ``C`` is padded to a multiple of 8 with steps that are
    zero in ``x, y`` and repeat the last ``b`` (exponents stay <= 0); their rows and columns are cut."""
    x, y, b = jnp.broadcast_arrays(x, y, b)
    lead, (chunk, channels) = x.shape[:-2], x.shape[-2:]
    padded = -(-chunk // _PAD_MULTIPLE) * _PAD_MULTIPLE
    # At most one batch axis (XLA CPU in jaxlib 0.10 crashed on some of these products' gradients when the
    # batch had a leading unit axis, e.g. [1, 2, N, C, K]); one chunk is one block, [1, C, K].
    flat = (-1,) if lead else ()
    x, y, b = (z.reshape(*flat, 1, chunk, channels) for z in (x, y, b))
    if padded != chunk:
        rows = [(0, 0)] * (x.ndim - 2) + [(0, padded - chunk), (0, 0)]
        x, y, b = jnp.pad(x, rows), jnp.pad(y, rows), jnp.pad(b, rows, mode="edge")
    out = _pairwise_bisect(x, y, b, strict)[..., 0, :chunk, :chunk]
    return out.reshape(*lead, chunk, chunk)


def _pairwise(x, y, b, *, strict: bool):
    """``P_ij = sum_c x_ic y_jc exp(b_ic - b_jc)`` for ``j <= i`` (``j < i`` if strict), else 0.

    ``x, y [..., C, K]``; ``b`` is ``[..., C, 1]`` (one decay for all channels: a masked product) or
    ``[..., C, K]`` (by recursive halving, ``_pairwise_channels``). ``b`` is the cumulative log decay
    (non-increasing along ``C``): every exponent taken is <= 0, whatever the decays' strength.
    """
    if b.shape[-1] == 1 or x.shape[-2] <= _BASE_BLOCK:
        return _pairwise_dense(x, y, b, strict)
    return _pairwise_channels(x, y, b, strict)


# ----------------------------------------------------------------------------------------------------
# The additive family.


class AdditiveChunk(NamedTuple):
    """The terms of one chunk (one head) that do not read ``S_0``."""

    q_gamma: shapes.ChunkKeys        # Q * gamma                                      [C, K]
    y_intra: shapes.ChunkValues      # [q_i . k_j exp(b_i - b_j)]_{j<=i} V            [C, V]
    update: shapes.ChunkState        # (K * exp(b_C - b))^T V                         [K, V]
    gamma_end: shapes.EndDecay       # gamma_C                                        [1 | K]


@shapes.typed
def _additive_chunk(q: shapes.ChunkKeys, k: shapes.ChunkKeys, v: shapes.ChunkValues,
                    log_decay: shapes.ChunkLogDecay) -> AdditiveChunk:
    b = _cumulative_log_decay(log_decay, q.shape[0], q.dtype)
    return AdditiveChunk(q_gamma=q * jnp.exp(b), y_intra=_pairwise(q, k, b, strict=False) @ v,
                         update=(k * jnp.exp(b[-1] - b)).T @ v, gamma_end=jnp.exp(b[-1]))


@shapes.typed
def _additive_step(s0: shapes.ChunkState, c: AdditiveChunk) -> tuple[shapes.ChunkState, shapes.ChunkValues]:
    """``S_0 -> S_C`` and the chunk's readouts ``Y``."""
    return c.gamma_end[:, None] * s0 + c.update, c.q_gamma @ s0 + c.y_intra


@shapes.typed
def additive(q: shapes.Queries, k: shapes.Keys, v: shapes.Values, log_decay: shapes.LogDecay,
             initial_state: shapes.Mean, *, chunk_size: int) -> tuple[shapes.Readouts, shapes.Mean]:
    """``S_t = A_t S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t``, in chunks (module doc, `AdditiveChunk`).

    Args:
      q, k: ``[B, T, H, K]`` (``k`` already times the input scale ``s_t``); v: ``[B, T, H, V]``.
      log_decay: None (``A_t = I``), ``[B, T, H]`` (``A_t = a_t I``) or ``[B, T, H, K]`` (``diag(a_t)``),
        ``log a_t <= 0``.
      initial_state: ``S_0 [B, H, K, V]``.
      chunk_size: ``C``.

    Returns ``y [B, T, H, V]`` and ``S_T [B, H, K, V]`` in the compute dtype (float32, or float64).
    """
    dtype = compute_dtype(q, k, v, initial_state)
    batch, time, heads = q.shape[:3]
    with jax.default_matmul_precision("float32"):
        q, k, v = (_to_chunks(x.astype(dtype), chunk_size) for x in (q, k, v))
        log_decay = None if log_decay is None else _to_chunks(log_decay.astype(dtype), chunk_size)
        terms = _every_chunk(_additive_chunk, q, k, v, log_decay)
        final, y = _through_chunks(_additive_step, _heads(initial_state.astype(dtype)), terms)
    return _from_chunks(y, batch, heads, time), final.reshape(initial_state.shape)


# ----------------------------------------------------------------------------------------------------
# The generalized delta rule (reset family; the exact family's mean pass).


class DeltaChunk(NamedTuple):
    """The terms of one chunk (one head) that do not read ``S_0``."""

    t_v: shapes.ChunkValues                     # T V, T = (I + L)^{-1}                            [C, V]
    attend: shapes.ChunkSquare                  # Att = [q_i . w_j exp(b_i - b_j)]_{j<=i}          [C, C]
    w_end: shapes.ChunkKeys                     # W * exp(b_C - b)                                 [C, K]
    gamma_end: shapes.EndDecay                  # gamma_C                                          [1 | K]
    readers: shapes.ChunkReaders                # [T (K * gamma); Q * gamma]: the rows reading S_0 [2C, K]


@shapes.typed
def _delta_chunk(q: shapes.ChunkKeys, k: shapes.ChunkKeys, w: shapes.ChunkKeys, v: shapes.ChunkValues,
                 log_decay: shapes.ChunkLogDecay) -> DeltaChunk:
    b = _cumulative_log_decay(log_decay, q.shape[0], q.dtype)
    gamma = jnp.exp(b)
    t = linalg.unit_lower_inverse(_pairwise(k, w, b, strict=True))       # T = (I + L)^{-1}
    t_v, t_k_gamma = jnp.split(t @ jnp.concatenate([v, k * gamma], -1), [v.shape[-1]], -1)   # one product
    return DeltaChunk(readers=jnp.concatenate([t_k_gamma, q * gamma]), t_v=t_v,
                      attend=_pairwise(q, w, b, strict=False), w_end=w * jnp.exp(b[-1] - b),
                      gamma_end=jnp.exp(b[-1]))


@shapes.typed
def _delta_step(s0: shapes.ChunkState, c: DeltaChunk, *, innovations: bool = False
                ) -> tuple[shapes.ChunkState, Union[shapes.ChunkValues, tuple[shapes.ChunkValues, shapes.ChunkSteps]]]:
    """``S_0 -> S_C`` and the chunk's readouts ``Y`` (with ``innovations``: ``(Y, |u_i|^2)``)."""
    chunk = c.t_v.shape[0]
    read = c.readers @ s0                                                # [(T (K * gamma)) S_0; (Q * gamma) S_0]
    u = c.t_v - read[:chunk]                                             # U: the innovations
    y = read[chunk:] + c.attend @ u
    return c.gamma_end[:, None] * s0 + c.w_end.T @ u, ((y, jnp.sum(u * u, -1)) if innovations else y)


@shapes.typed
def delta_rule(q: shapes.Queries, k: shapes.Keys, w: shapes.Keys, v: shapes.Values, log_decay: shapes.LogDecay,
               initial_state: shapes.Mean, *, chunk_size: int) -> tuple[shapes.Readouts, shapes.Mean]:
    """``S_t = A_t S_{t-1} + w_t (v_t - (A_t S_{t-1})^T k_t)^T``, ``y_t = S_t^T q_t``: erase key ``k``,
    write key ``w`` (reset family: ``w = eta k``; exact family: ``w = Kg``), in chunks (module doc,
    `DeltaChunk`). Layouts as `additive`, ``w [B, T, H, K]``."""
    return _delta_scan(q, k, w, v, log_decay, initial_state, chunk_size=chunk_size, innovations=False)[:2]


def _delta_scan(q, k, w, v, log_decay, initial_state, *, chunk_size: int, innovations: bool):
    """`delta_rule`'s ``(y, S_T)``, and the squared innovations ``|u_t|^2 [B, T, H]`` (None unless
    ``innovations``; for the likelihood)."""
    dtype = compute_dtype(q, k, w, v, initial_state)
    batch, time, heads = q.shape[:3]
    with jax.default_matmul_precision("float32"):
        q, k, w, v = (_to_chunks(x.astype(dtype), chunk_size) for x in (q, k, w, v))
        log_decay = None if log_decay is None else _to_chunks(log_decay.astype(dtype), chunk_size)
        terms = _every_chunk(_delta_chunk, q, k, w, v, log_decay)
        final, out = _through_chunks(functools.partial(_delta_step, innovations=innovations),
                                     _heads(initial_state.astype(dtype)), terms)
    y, squared = out if innovations else (out, None)
    squared = None if squared is None else _from_chunks(squared, batch, heads, time)
    return _from_chunks(y, batch, heads, time), final.reshape(initial_state.shape), squared


# ----------------------------------------------------------------------------------------------------
# The exact family: the covariance pass (then the mean pass is `delta_rule` with w = Kg).


class CovarianceChunk(NamedTuple):
    """The terms of one chunk (one head) that do not read ``P_c``; ``rg`` and ``k_left`` (None for
    isotropic noise) mark process noise along the key (module doc)."""

    g: shapes.ChunkKeys                 # G = K * gamma                                          [C, K]
    n: shapes.ChunkSquare               # Sigma's noise part: N, or Rg diag(q) Rg^T + diag(1 / beta) [C, C]
    k_noise: shapes.ChunkKeys           # K * alpha (isotropic) or K * q (key noise)             [C, K]
    k_end: shapes.ChunkKeys             # Cov(y, s_C)'s noise part before X: K * R_C. alpha, or
                                        # (R * K K^T) (K * q R_C.)                               [C, K]
    r: shapes.ChunkSquare               # R_ij = exp(b_i - b_j) (j <= i), else 0                 [C, C]
    gamma: shapes.ChunkSteps            # gamma                                                  [C]
    alpha: shapes.ChunkSteps            # alpha (isotropic noise accumulated since the start)    [C]
    q: Optional[shapes.ChunkKeys]       # Q (for the predictive variance only)                   [C, K]
    f: Optional[shapes.ChunkSquare]     # Cov(q_i . s_i, y_m)'s noise part (variance only)       [C, C]
    q_noise: Optional[shapes.ChunkSteps]  # q_i^T (noise part of P_bar_i) q_i (variance only)    [C]
    rg: Optional[shapes.ChunkSquare]    # key noise: R * (K K^T)                                 [C, C]
    k_left: Optional[shapes.ChunkKeys]  # key noise: K * R_C.^2: the noise left at C is k_noise^T k_left [C, K]


@shapes.typed
def _covariance_chunk(q: shapes.ChunkKeys, k: shapes.ChunkKeys, log_decay: Optional[shapes.ChunkSteps],
                      noise: shapes.ChunkSteps, precision: shapes.ChunkSteps, *,
                      variance: bool, key_noise: bool = False) -> CovarianceChunk:
    chunk = k.shape[0]
    b = _cumulative_log_decay(log_decay, chunk, k.dtype)[:, 0]                    # scalar decay: b [C]
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    diff = b[:, None] - b[None, :]                                       # b_i - b_j
    r = jnp.exp(jnp.where(lower, diff, -jnp.inf))                        # R_ij, j <= i, else 0
    gamma = jnp.exp(b)
    alpha = (r ** 2) @ noise                                             # sum_{m<=i} q_m exp(2 (b_i - b_m))
    qk = q @ k.T if variance else None
    if key_noise:                                                        # Q_m = q_m k_m k_m^T
        # M M^T (M = Rg diag(sqrt q)) as Rg diag(q) Rg^T: no square root, whose derivative at q = 0 is infinite
        rg = r * (k @ k.T)                                               # R_im (k_i . k_m), m <= i
        return CovarianceChunk(
            g=k * gamma[:, None], n=(rg * noise[None, :]) @ rg.T + jnp.diag(1.0 / precision),
            k_noise=k * noise[:, None], k_end=rg @ (k * (noise * r[-1])[:, None]), r=r, gamma=gamma, alpha=alpha,
            q=q if variance else None, f=(r * qk * noise[None, :]) @ rg.T if variance else None,
            q_noise=jnp.sum(r ** 2 * noise[None, :] * qk ** 2, -1) if variance else None,
            rg=rg, k_left=k * (r[-1] ** 2)[:, None])
    alpha_min = jnp.where(lower, alpha[None, :], alpha[:, None])         # alpha_{min(i, j)}
    n = jnp.exp(-jnp.abs(diff)) * alpha_min * (k @ k.T) + jnp.diag(1.0 / precision)
    return CovarianceChunk(
        g=k * gamma[:, None], n=n, k_noise=k * alpha[:, None], k_end=k * (r[-1] * alpha)[:, None], r=r,
        gamma=gamma, alpha=alpha, q=q if variance else None,
        f=r * qk * alpha[None, :] if variance else None,
        q_noise=alpha * jnp.sum(q * q, -1) if variance else None, rg=None, k_left=None)


@shapes.typed
def _covariance_step(p: shapes.ChunkCovariance, c: CovarianceChunk, *,
                     boundaries: bool = False) -> tuple[shapes.ChunkCovariance, dict]:
    """``P_c -> P_C`` and the chunk's gains ``Kg`` (and predictive and innovation variances, and ``P_c``,
    if asked)."""
    sigma = c.g @ p @ c.g.T + c.n
    chol, x = linalg.cholesky_with_inverse(kalman.symmetrize(sigma))   # L and X = L^{-1}
    gw_p = x @ c.g @ p                                                   # Gw P_c
    if c.rg is None:                                                     # Q_t = q_t I
        noise_gains = (x * c.r) @ c.k_noise
        noise_end = c.alpha[-1] * jnp.eye(p.shape[-1], dtype=p.dtype)
    else:                                                                # Q_t = q_t k_t k_t^T
        noise_gains = (c.r * (x @ c.rg)) @ c.k_noise
        noise_end = c.k_noise.T @ c.k_left
    gains = (c.gamma[:, None] * gw_p + noise_gains) / jnp.diagonal(chol)[:, None]
    z = c.gamma[-1] * gw_p + x @ c.k_end
    p_end = kalman.symmetrize(c.gamma[-1] ** 2 * p + noise_end - z.T @ z)
    out = {"gains": gains}
    if c.q is not None:                                                  # diagnostics
        out["innovation_variance"] = jnp.diagonal(chol) ** 2             # s_i = Var(y_i | y_<i) = L_ii^2
        e = jnp.tril(c.gamma[:, None] * (c.q @ gw_p.T) + c.f @ x.T)
        out["variance"] = c.gamma ** 2 * jnp.sum((c.q @ p) * c.q, -1) + c.q_noise - jnp.sum(e * e, -1)
    if boundaries:
        out["start"] = p
    return p_end, out


def _covariance_scan(q, k, log_decay, noise, precision, initial_covariance, *, chunk_size: int,
                     variance: bool, boundaries: bool = False, key_noise: bool = False):
    """`covariance_pass`'s three results, then with ``boundaries`` ``P`` at the start of every chunk
    ``[N, B*H, K, K]`` (for numerical checks, `benchmarks/long_sequence.py`; else None), then with
    ``variance`` the innovation variances ``s_t [B, T, H]`` (for the likelihood; else None).
    ``key_noise``: ``noise`` is ``q_t`` of ``Q_t = q_t k_t k_t^T`` instead of ``q_t I``."""
    dtype = compute_dtype(q, k, noise, precision, initial_covariance)
    batch, time, heads = q.shape[:3]
    with jax.default_matmul_precision("float32"):
        q, k = (_to_chunks(x.astype(dtype), chunk_size) for x in (q, k))
        log_decay = None if log_decay is None else _to_chunks(log_decay.astype(dtype), chunk_size)
        noise = _to_chunks(noise.astype(dtype), chunk_size)                           # pads add none
        precision = _to_chunks(precision.astype(dtype), chunk_size, pad_value=1.0)    # pads: k = 0
        terms = _every_chunk(functools.partial(_covariance_chunk, variance=variance, key_noise=key_noise), q, k,
                             log_decay, noise, precision)
        final, out = _through_chunks(functools.partial(_covariance_step, boundaries=boundaries),
                                     _heads(initial_covariance.astype(dtype)), terms)
    gains = _from_chunks(out["gains"], batch, heads, time)
    predictive, innovation = ((_from_chunks(out[n], batch, heads, time) for n in ("variance", "innovation_variance"))
                              if variance else (None, None))
    return gains, final.reshape(initial_covariance.shape), predictive, out.get("start"), innovation


@shapes.typed
def covariance_pass(q: shapes.Queries, k: shapes.Keys, log_decay: Optional[shapes.PerHead], noise: shapes.PerHead,
                    precision: shapes.PerHead, initial_covariance: shapes.Covariance, *, chunk_size: int,
                    variance: bool, key_noise: bool = False
                    ) -> tuple[shapes.Keys, shapes.Covariance, Optional[shapes.PerHead]]:
    """The exact family's covariance recursion, in chunks (module doc, `CovarianceChunk`): scalar or no
    decay, ``Q_t = noise_t I`` or, with ``key_noise``, ``Q_t = noise_t k_t k_t^T``.

    Args:
      q, k: ``[B, T, H, K]``.
      log_decay: None or ``[B, T, H]``.
      noise: ``q_t`` ``[B, T, H]`` (zeros without process noise).
      precision: ``beta_t`` ``[B, T, H]``.
      initial_covariance: ``P_0 [B, H, K, K]``.
      variance: also return the predictive variances.

    Returns the gains ``Kg [B, T, H, K]``, ``P_T [B, H, K, K]`` and ``q_t^T P_t q_t [B, T, H]`` (None
    unless ``variance``), in the compute dtype.
    """
    return _covariance_scan(q, k, log_decay, noise, precision, initial_covariance, chunk_size=chunk_size,
                            variance=variance, key_noise=key_noise)[:3]


# ----------------------------------------------------------------------------------------------------
# The lowering: structure -> which reference, with what write key and what noise.


def reason_not_applicable(structure) -> str | None:
    """Why the chunked forms do not cover a structure, or None."""
    if structure.transition == "dense":
        return "a dense transition has no chunked form (its products over time are not C x C masks)"
    if structure.family != "exact":
        return None
    if structure.transition == "diagonal":
        return ("the exact chunked filter needs a scalar or no decay (a channel-wise decay with a full "
                "covariance does not reduce to Gram matrices of the keys)")
    if structure.noise == "stationary" and not structure.stationary.isotropic:
        return ("stationary noise towards a non-isotropic prior, Q_t = (1 - a_t^2) P_0, is not isotropic; "
                "the exact chunked filter needs Q_t = q_t I")
    return None


def noise_variance(structure, x: StepInputs):
    """``q_t`` of ``Q_t = q_t I`` or, for key noise, of ``Q_t = q_t k_t k_t^T``, ``[B,T,H]`` (zeros without
    noise)."""
    if structure.noise in ("random_walk", "key"):
        return x.process_noise
    dtype = x.compute_dtype
    if structure.noise == "stationary":                                  # P_s = l^2 I: Q_t = l^2 (1 - a_t^2) I
        log_a = x.transition if x.transition is not None else jnp.zeros(x.k.shape[:3], dtype)
        return -structure.stationary.variance * jnp.expm1(2 * log_a)
    return jnp.zeros(x.k.shape[:3], dtype)


@shapes.typed
def run(structure, x: StepInputs, state: FilterState, *, diagnostics: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE) -> FilterOutput:
    if structure.family == "additive":
        k = x.k if x.input_scale is None else x.k.astype(x.compute_dtype) * x.input_scale[..., None]
        y, mean = additive(x.q, k, x.v, x.transition, state.mean, chunk_size=chunk_size)
        return FilterOutput(y, FilterState(mean, None))
    if structure.family == "reset":
        w = x.write_strength[..., None] * x.k                            # Kg = eta k
        y, mean = delta_rule(x.q, x.k, w, x.v, x.transition, state.mean, chunk_size=chunk_size)
        return FilterOutput(y, FilterState(mean, None))
    # Without diagnostics this is covariance_pass, then delta_rule (the signatures a kernel implements).
    gains, covariance, variance, _, innovation_variance = _covariance_scan(
        x.q, x.k, x.transition, noise_variance(structure, x), x.precision, state.covariance,
        chunk_size=chunk_size, variance=diagnostics, key_noise=structure.noise == "key")
    y, mean, squared_innovation = _delta_scan(x.q, x.k, gains, x.v, x.transition, state.mean,
                                              chunk_size=chunk_size, innovations=diagnostics)
    out = FilterOutput(y, FilterState(mean, covariance))
    if diagnostics:
        write_gain = jnp.sum(x.k.astype(gains.dtype) * gains, -1)       # g_t = k_t^T Kg_t
        log_density = kalman.log_predictive_density(squared_innovation, innovation_variance, x.v.shape[-1])
        out = out._replace(diagnostics=kalman.Diagnostics(write_gain, variance, log_density))
    return out


def check_chunk_size(value) -> None:
    """The ``chunk_size`` compile option: a positive integer."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise BackendError(f"chunk_size={value!r}: accepted: a positive integer (typically 16-128).")


class Chunked(Lowering):
    name = "chunked"
    summary = ("chunks of C steps: C x C masked products and a triangular solve per chunk, a scan over "
               "T / C chunks; additive: SSD / GLA; reset: WY / UT transform; exact: one C x C Cholesky and "
               "a rank-C update of P per chunk, then the mean as a delta rule; O(T C (K + V) + T K V) work, "
               "exact family + O(T K^2)")
    options = {"chunk_size": check_chunk_size}

    def reason_not_applicable(self, structure):
        return reason_not_applicable(structure)

    def supports_diagnostics(self, structure):
        return structure.family == "exact"

    def run(self, structure, x, state, *, diagnostics, chunk_size=DEFAULT_CHUNK_SIZE):
        return run(structure, x, state, diagnostics=diagnostics, chunk_size=chunk_size)


LOWERING = Chunked()
