"""The chunked lowering: the matmul-heavy forms of fast kernels, in pure JAX.

The sequence is cut into chunks of ``C`` steps. Inside a chunk everything is ``C x C`` masked products
and one triangular solve, computed for all chunks at once; between chunks a ``lax.scan`` passes the
state (``M``, and ``P`` for the exact family). Chunk bodies are rematerialized in the backward pass
(``jax.checkpoint``), so reverse mode stores only chunk-boundary states: memory is linear in ``T``.

Notation inside a chunk (steps ``i, j = 1..C``): ``b_i = sum_{m<=i} log a_m`` (per channel for a
diagonal transition), so ``gamma_i = exp(b_i)`` is the decay since the chunk start and
``exp(b_i - b_j) <= 1`` for ``j <= i`` the decay between two steps: every exponent is non-positive.

**Additive** (SSD / GLA)::

    Y = (Q * gamma) M_0^T + [(Q K^T) * exp(b_i - b_j) * s_j]_{j<=i} V
    M_C = M_0 diag(gamma_C) + V^T diag(s) (K * exp(b_C - b))

**Generalized delta rule** ``M_i = M_{i-1} A_i (I - k_i w_i^T) + v_i w_i^T`` (erase key ``k``, write key
``w``; the reset family has ``w = eta k``, the exact family ``w = Kg``): with the innovations
``u_i = v_i - M_{i-1} A_i k_i``, ``M_i = M_{i-1} A_i + u_i w_i^T``, and unrolling gives the UT transform::

    (I + L) U = V - (K * gamma) M_0^T,     L_ij = sum_c k_ic w_jc exp(b_ic - b_jc)   (j < i)
    Y   = (Q * gamma) M_0^T + [q_i . (w_j * exp(b_i - b_j))]_{j<=i} U
    M_C = M_0 diag(gamma_C) + U^T (W * exp(b_C - b))

``(I + L)^{-1}`` does not depend on ``M_0``, so ``T V`` and ``T (K * gamma)`` are computed for all chunks
in parallel and the scan does only ``C x K x V`` products.

**Exact** (scalar or no decay, isotropic noise ``Q_t = q_t I``): the covariance recursion never sees the
values. Inside a chunk starting from ``P_c``, the observations ``y_i = k_i^T s_i + e_i`` of one value row
are jointly Gaussian with covariance::

    Sigma = (gamma gamma^T) * (K P_c K^T) + (R * alpha_min) * (K K^T) + diag(1 / beta)

where ``R_ij = exp(-|b_i - b_j|)``, ``alpha_i = a_i^2 alpha_{i-1} + q_i`` (``alpha_0 = 0``) is the noise
accumulated since the chunk start and ``alpha_min = alpha_{min(i, j)}``. Conditioning on the
observations one by one is the Cholesky factorization ``Sigma = L L^T``: with ``X = L^{-1}``
the whitened innovations are ``eps = X (y - E y)``, and since ``Cov(s_i, y_m) = gamma_i gamma_m P_c k_m
+ R_im alpha_m k_m`` for ``m <= i``::

    Kt  = X (K * gamma)
    Kg_i = [gamma_i P_c Kt_i + sum_m X_im R_im alpha_m k_m] / L_ii        (the gains, all at once)
    Z    = gamma_C Kt P_c + X (K * R_C. alpha)                             (Cov(s_C, eps))
    P_C  = gamma_C^2 P_c + alpha_C I - Z^T Z                                (a rank-C update)

and the predictive variance ``q_i^T P_i q_i = gamma_i^2 q_i^T P_c q_i + alpha_i |q_i|^2 - sum_{j<=i} E_ij^2``
with ``E = diag(gamma) Q P_c Kt^T + F X^T``, ``F_im = R_im alpha_m q_i . k_m`` (``m <= i``). The mean pass
is then the generalized delta rule above with ``w = Kg``.

Precision: inputs may be bf16 or f32; everything here runs in f32 (f64 with x64 inputs), including
covariances, Gram matrices and factorizations.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from filters import kalman, linalg
from filters.inputs import FilterState, StepInputs
from filters.lowering import BackendError, FilterOutput, Lowering

DEFAULT_CHUNK_SIZE = 64


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


def supports_diagnostics(structure) -> bool:
    return structure.family == "exact"


# ----------------------------------------------------------------------------------------------------
# Layout helpers: [B, T, H, ...] <-> [B, H, N, C, ...], padding with steps that change nothing.


def _to_chunks(x, chunk, pad_value=0.0):
    batch, time, heads = x.shape[:3]
    n = -(-time // chunk)
    pad = n * chunk - time
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    x = x.reshape(batch, n, chunk, heads, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)          # [B, H, N, C, ...]


def _from_chunks(x, time):
    batch, heads, n, chunk = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3).reshape(batch, n * chunk, heads, *x.shape[4:])
    return x[:, :time]


def _scan_chunks(body, carry, xs):
    """``lax.scan`` over the chunk axis (2) of every leaf; chunk bodies are recomputed in backward."""
    xs = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 2, 0), xs)
    carry, ys = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), carry, xs)
    return carry, jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 2), ys)


def _cumulative_log_decays(x: StepInputs, structure, chunk):
    """``b_i = sum_{m<=i} log a_m`` within each chunk: ``[B,H,N,C,1]`` (scalar or no decay) or
    ``[B,H,N,C,K]`` (diagonal)."""
    if x.transition is None:
        # b = 0, written as such: a cumsum of zeros is a constant that XLA folds element by element at
        # compile time (seconds per layer on the GPU at batch 256)
        return jnp.zeros_like(_to_chunks(x.k[..., :1], chunk))
    log_a = x.transition[..., None] if structure.transition == "scalar" else x.transition
    return jnp.cumsum(_to_chunks(log_a, chunk), axis=-2)


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
    """``_pairwise`` on blocks ``x, y, b [n, m, h, K] -> [n, m, h, h]``, by halving ``h``.

    With ``r = b_{h/2}`` (the last row of the first half) the lower-left quadrant is
    ``(x_2 * exp(b_2 - r)) (y_1 * exp(r - b_1))^T`` (both exponents <= 0: ``b`` is non-increasing);
    the two diagonal quadrants recurse, all blocks of one level in one batch.
    """
    h = x.shape[-2]
    if h <= _BASE_BLOCK or h % 2:
        return _pairwise_dense(x, y, b, strict)
    half = h // 2
    halves = lambda z: z.reshape(*z.shape[:-3], 2 * z.shape[-3], half, z.shape[-1])
    inner = _pairwise_bisect(halves(x), halves(y), halves(b), strict)    # [n, 2m, h/2, h/2]
    inner = inner.reshape(*inner.shape[:-3], -1, 2, half, half)
    ref = b[..., half - 1:half, :]
    x_decayed = x[..., half:, :] * jnp.exp(b[..., half:, :] - ref)
    y_decayed = y[..., :half, :] * jnp.exp(ref - b[..., :half, :])
    lower = x_decayed @ jnp.swapaxes(y_decayed, -1, -2)                  # [n, m, h/2, h/2]
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
    # One flat batch axis (XLA CPU in jaxlib 0.10 crashed on some of these products' gradients when the
    # batch had a leading unit axis, e.g. [1, 2, N, C, K]).
    x, y, b = (z.reshape(-1, 1, chunk, channels) for z in (x, y, b))
    if padded != chunk:
        rows = [(0, 0), (0, 0), (0, padded - chunk), (0, 0)]
        x, y, b = jnp.pad(x, rows), jnp.pad(y, rows), jnp.pad(b, rows, mode="edge")
    out = _pairwise_bisect(x, y, b, strict)[:, 0, :chunk, :chunk]
    return out.reshape(*lead, chunk, chunk)


def _pairwise(x, y, b, *, strict: bool):
    """``P_ij = sum_c x_ic y_jc exp(b_ic - b_jc)`` for ``j <= i`` (``j < i`` if strict), else 0.

    ``b`` is ``[..., C, 1]`` (one decay for all channels: a masked product) or ``[..., C, K]`` (by
    recursive halving, ``_pairwise_channels``). ``b`` is the cumulative log decay (non-increasing along
    ``C``): every exponent taken is <= 0, whatever the decays' strength.
    """
    if b.shape[-1] == 1 or x.shape[-2] <= _BASE_BLOCK:
        return _pairwise_dense(x, y, b, strict)
    return _pairwise_channels(x, y, b, strict)


# ----------------------------------------------------------------------------------------------------
# The additive family.


def additive(structure, x: StepInputs, state: FilterState, chunk: int):
    time = x.k.shape[1]
    write = x.k if x.input_scale is None else x.k * x.input_scale[..., None]
    q, k, v = (_to_chunks(z, chunk) for z in (x.q, write, x.v))
    b = _cumulative_log_decays(x, structure, chunk)                        # [B,H,N,C,1|K]
    intra = _pairwise(q, k, b, strict=False) @ v                          # [B,H,N,C,V]
    q_decayed = q * jnp.exp(b)
    k_to_end = k * jnp.exp(b[..., -1:, :] - b)
    update = jnp.swapaxes(v, -1, -2) @ k_to_end                           # [B,H,N,V,K]
    end_decay = jnp.exp(b[..., -1, :])                                    # [B,H,N,1|K]

    def body(mean, inputs):
        q_c, update_c, end_c = inputs
        y_inter = q_c @ jnp.swapaxes(mean, -1, -2)                         # [B,H,C,V]
        return mean * end_c[..., None, :] + update_c, y_inter

    final, inter = _scan_chunks(body, state.mean, (q_decayed, update, end_decay))
    return _from_chunks(intra + inter, time), FilterState(final, None)


# ----------------------------------------------------------------------------------------------------
# The generalized delta rule (reset family; the exact family's mean pass).


def delta_rule(q, k, w, v, b, mean0, time):
    """``M_i = M_{i-1} A_i (I - k_i w_i^T) + v_i w_i^T``, ``y_i = M_i q_i``, in chunks (see module doc).

    ``q, k, w [B,H,N,C,K]``, ``v [B,H,N,C,V]``, cumulative log decays ``b [B,H,N,C,1|K]``,
    ``mean0 [B,H,V,K]``. Returns ``(y [B,T,H,V], M_final)``.
    """
    chunk, value_dim = k.shape[-2], v.shape[-1]
    lower = _pairwise(k, w, b, strict=True)                               # L
    gamma = jnp.exp(b)
    # One triangular solve for both right-hand sides: T V and T (K * gamma).
    solved = linalg.unit_lower_inverse(lower) @ jnp.concatenate([v, k * gamma], -1)
    # Stack the rows that read M_0 (the innovations' correction and the queries) into one product.
    readers = jnp.concatenate([solved[..., value_dim:], q * gamma], -2)  # [2C, K]
    attend = _pairwise(q, w, b, strict=False)                             # [q_i . w_j decayed]_{j<=i}
    w_to_end = w * jnp.exp(b[..., -1:, :] - b)
    end_decay = jnp.exp(b[..., -1, :])

    def body(mean, inputs):
        u_v, readers_c, attend_c, w_end, end_c = inputs
        read = readers_c @ jnp.swapaxes(mean, -1, -2)                     # [2C, V]: (T K gamma) M_0^T, (Q gamma) M_0^T
        innovations = u_v - read[..., :chunk, :]                          # U [C, V]
        y = read[..., chunk:, :] + attend_c @ innovations
        new_mean = mean * end_c[..., None, :] + jnp.swapaxes(innovations, -1, -2) @ w_end
        return new_mean, y

    final, y = _scan_chunks(body, mean0, (solved[..., :value_dim], readers, attend, w_to_end, end_decay))
    return _from_chunks(y, time), final


def reset(structure, x: StepInputs, state: FilterState, chunk: int):
    time = x.k.shape[1]
    gain = x.write_strength[..., None] * x.k                               # Kg = eta k
    q, k, w, v = (_to_chunks(z, chunk) for z in (x.q, x.k, gain, x.v))
    b = _cumulative_log_decays(x, structure, chunk)
    y, final = delta_rule(q, k, w, v, b, state.mean, time)
    return y, FilterState(final, None)


# ----------------------------------------------------------------------------------------------------
# The exact family: covariance pass, then the mean pass.


def _isotropic_noise(structure, x: StepInputs):
    """``q_t`` of ``Q_t = q_t I`` ``[B,T,H]`` (zeros without noise)."""
    if structure.noise == "random_walk":
        return x.process_noise
    if structure.noise == "stationary":
        variance = structure.stationary.variance                          # P_s = l^2 I
        log_a = x.transition if x.transition is not None else jnp.zeros(x.k.shape[:3], x.k.dtype)
        return -variance * jnp.expm1(2 * log_a)                            # l^2 (1 - a^2)
    return jnp.zeros(x.k.shape[:3], x.k.dtype)


def covariance_pass(structure, x: StepInputs, cov0, chunk: int):
    """The covariance pass (module doc). Returns the gains ``Kg [B,H,N,C,K]``, the final ``P``, the
    predictive variances ``[B,H,N,C]``, the cumulative log decays ``b [B,H,N,C]`` and the covariance at
    the start of every chunk ``[B,H,N,K,K]`` (for numerical checks)."""
    q, k = _to_chunks(x.q, chunk), _to_chunks(x.k, chunk)
    b = _cumulative_log_decays(x, structure, chunk)[..., 0]               # [B,H,N,C]
    noise = _to_chunks(_isotropic_noise(structure, x), chunk)             # q_t; pads add none
    inv_beta = _to_chunks(1.0 / x.precision, chunk, pad_value=1.0)        # pads: unit noise, k = 0
    dtype = k.dtype
    eye_c = jnp.eye(chunk, dtype=dtype)
    lower_incl = jnp.tril(jnp.ones((chunk, chunk), bool))
    diff = b[..., :, None] - b[..., None, :]                              # b_i - b_j
    r_lower = jnp.exp(jnp.where(lower_incl, diff, -jnp.inf))              # R_ij, j <= i, else 0
    r_sym = jnp.exp(-jnp.abs(diff))
    # alpha_i = sum_{m <= i} q_m exp(2 (b_i - b_m)): the noise accumulated since the chunk start.
    alpha = jnp.einsum("...im,...m->...i", r_lower ** 2, noise)
    alpha_min = jnp.where(lower_incl, alpha[..., None, :], alpha[..., :, None])   # alpha_{min(i, j)}
    gamma = jnp.exp(b)
    k_gamma = k * gamma[..., None]
    gram_kk = k @ jnp.swapaxes(k, -1, -2)
    gram_qk = q @ jnp.swapaxes(k, -1, -2)
    noise_part = r_sym * alpha_min * gram_kk + inv_beta[..., None] * eye_c
    # The whitening X = L^{-1} and X (K * gamma) do not depend on P_c only through Sigma; they are
    # computed per chunk inside the scan.
    r_end = r_lower[..., -1, :]                                           # exp(b_C - b_m)
    k_alpha = k * alpha[..., None]
    k_end = k * (r_end * alpha)[..., None]
    f_matrix = r_lower * gram_qk * alpha[..., None, :]                    # F_im (m <= i)

    def body(cov, inputs):
        k_g, noise_c, k_a, k_e, f_c, r_l, gam, q_c, alpha_c = inputs
        sigma = k_g @ cov @ jnp.swapaxes(k_g, -1, -2) + noise_c
        chol, whiten = linalg.cholesky_with_inverse(kalman.symmetrize(sigma))   # L and X = L^{-1}
        k_t = whiten @ k_g                                                # Kt = X (K * gamma)
        kt_p = k_t @ cov
        pivots = jnp.diagonal(chol, axis1=-2, axis2=-1)
        gains = (gam[..., None] * kt_p + (whiten * r_l) @ k_a) / pivots[..., None]
        z = gam[..., -1, None, None] * kt_p + whiten @ k_e
        end = gam[..., -1, None, None]
        new_cov = kalman.symmetrize(end ** 2 * cov + alpha_c[..., -1, None, None] * jnp.eye(cov.shape[-1], dtype=dtype)
                                    - jnp.swapaxes(z, -1, -2) @ z)
        # Predictive variance q_i^T P_i q_i.
        e = gam[..., :, None] * (q_c @ cov @ jnp.swapaxes(k_t, -1, -2)) + f_c @ jnp.swapaxes(whiten, -1, -2)
        e = jnp.where(lower_incl, e, 0.0)
        variance = (gam ** 2 * jnp.einsum("...ik,...kl,...il->...i", q_c, cov, q_c)
                    + alpha_c * jnp.sum(q_c * q_c, -1) - jnp.sum(e * e, -1))
        return new_cov, (gains, variance, cov)

    final_cov, (gains, variance, boundaries) = _scan_chunks(
        body, cov0, (k_gamma, noise_part, k_alpha, k_end, f_matrix, r_lower, gamma, q, alpha))
    return gains, final_cov, variance, b, boundaries


def exact(structure, x: StepInputs, state: FilterState, chunk: int, diagnostics: bool = False):
    time = x.k.shape[1]
    gains, final_cov, variance, b, _ = covariance_pass(structure, x, state.covariance, chunk)
    q, k, v = (_to_chunks(z, chunk) for z in (x.q, x.k, x.v))
    y, final_mean = delta_rule(q, k, gains, v, b[..., None], state.mean, time)
    out = (y, FilterState(final_mean, final_cov))
    if diagnostics:
        gain = jnp.sum(k * gains, -1)
        out += (kalman.Diagnostics(_from_chunks(gain, time), _from_chunks(variance, time)),)
    return out


def run(structure, x: StepInputs, state: FilterState, *, diagnostics: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE):
    x = x.in_compute_dtype()
    transpose = lambda s: s._replace(mean=jnp.swapaxes(s.mean, -1, -2))
    state = transpose(state)
    if structure.family == "exact":
        out = exact(structure, x, state, chunk_size, diagnostics)
    else:
        lowering = additive if structure.family == "additive" else reset
        out = lowering(structure, x, state, chunk_size)
    return FilterOutput(out[0], transpose(out[1]), *out[2:])


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
        return supports_diagnostics(structure)

    def run(self, structure, x, state, *, diagnostics, chunk_size=DEFAULT_CHUNK_SIZE):
        return run(structure, x, state, diagnostics=diagnostics, chunk_size=chunk_size)


LOWERING = Chunked()
