"""flash-linear-attention's functional ops, with fla 0.6's signatures and conventions, each a use of
`filters.compile`.

For code written against ``fla.ops`` (PyTorch): the same names, arguments and defaults, in JAX::

    from filters import fla
    o, final_state = fla.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)

Conventions (fla's): ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, per-head gates ``[B, T, H]`` and
channel-wise ones ``[B, T, H, K]``; decays as logs (``g = log alpha <= 0``); the readout is scaled,
``o_t = S_t^T (scale q_t)`` with ``scale`` defaulting to ``K ** -0.5``; the state ``S [B, H, K, V]``
(keys by values, the layout of `filters.FilterState`; ``state_v_first=True``: ``[B, H, V, K]``);
every op returns ``(o, final_state)``, ``final_state`` None unless ``output_final_state``. ``o`` has the
dtype of ``q``, ``final_state`` is float32 (float64 for float64 inputs).

The recurrences, all design models (`docs/unification.md`)::

    simple GLA        S_t = exp(g_t) S_{t-1} + k_t v_t^T                       g [B,T,H] (+ g_gamma [H])
    GLA               S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T                 g [B,T,H,K]
    DeltaNet          S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
    Gated DeltaNet    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,  a_t = exp(g_t)
    o_t = S_t^T (scale q_t)

``chunk_*`` run the fastest chunked lowering here (``backend="auto"``: the Pallas kernels or the chunked
form), ``fused_recurrent_*`` the sequential scan (``backend="sequential"``); ``backend=`` picks another,
``validate=False`` skips the value checks (as `filters.Filter` takes it), ``chunk_size`` goes to the
lowering. Nothing here computes the recurrence: each op maps its arguments to a design model's run-time
inputs and calls the compiled filter.

What differs from fla (``docs/fla.md``): DeltaNet and Gated DeltaNet steps must be representable as a
design model, ``0 <= beta_t |k_t|^2 < 1`` (a covariance reset; fla also takes ``beta`` up to 2 with
``allow_neg_eigval`` and unnormalized keys): a step outside is a `FilterInputError` that says so. Decays
must be ``g <= 0``. A decay over values (``gv``) and a ``beta`` per value channel are not design models
and are refused. Packed variable-length batches (``cu_seqlens``) and context parallelism
(``cp_context``) are not supported here yet.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import designmodels as dm
from filters.compiler import compile as _compile
from filters.checks import FilterInputError

# the design models of the shared layers (their proofs: docs/unification.md, tests/test_unification.py)
LINEAR_ATTENTION = dm.linear_attention()
SIMPLE_GLA = dm.DesignModel(transition=dm.ScalarDecay(None), observation=dm.LatentInput(), name="simple_gla")
GLA = dm.gla()
DELTANET = dm.deltanet()
GATED_DELTANET = dm.gated_deltanet()
GATED_DELTANET_CHANNELWISE = dm.DesignModel(      # fused_recurrent_gated_delta_rule with ``gk``: KDA-style
    transition=dm.DiagonalDecay(None), observation=dm.KeyValueObservation(None),
    covariance=dm.Reset(write_strength=True), name="gated_deltanet_channelwise")

# fla's keyword arguments that are accepted here with a value that changes nothing
_NEUTRAL = {"cu_seqlens_cpu": None, "chunk_indices": None, "cp_context": None}
_RENAMED = {"transpose_state_layout": "state_v_first (renamed in fla 0.6)",
            "head_first": "nothing: inputs are [B, T, H, ...] (head_first was removed in fla)"}


class FlaArgumentError(FilterInputError):
    """An fla argument that this module does not take, or a value that is not a design model's."""


def _l2norm(x):
    """fla's ``l2norm``: ``x / sqrt(|x|^2 + 1e-6)`` over the last axis, in float32, back in ``x``'s dtype."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def _check_options(op: str, cu_seqlens, options: dict) -> dict:
    """The lowering options among fla's extra keywords (``chunk_size``); the rest refused by name."""
    if cu_seqlens is not None:
        raise FlaArgumentError(f"{op}(cu_seqlens=...): packed variable-length batches are not supported here "
                               "yet; accepted: cu_seqlens=None (pad the sequences into a [B, T, ...] batch, or "
                               "run each one alone).")
    lowering = {}
    for name, value in options.items():
        if name == "chunk_size":
            lowering["chunk_size"] = value
        elif name in _NEUTRAL and value is _NEUTRAL[name]:
            continue
        elif name in _NEUTRAL:
            raise FlaArgumentError(f"{op}({name}=...): not supported here (context parallelism and packed "
                                   f"batches are not); accepted: {name}=None.")
        else:
            hint = f"; pass {_RENAMED[name]}" if name in _RENAMED else dm.did_you_mean(
                name, ["scale", "initial_state", "output_final_state", "chunk_size", "backend", "validate"])
            raise FlaArgumentError(f"{op}: unknown keyword argument {name!r}{hint}.")
    return lowering


def _beta(op: str, beta, q, sigmoid: bool, allow_neg_eigval: bool):
    """fla's ``beta [B, T, H]`` (default ones), through its sigmoid (times 2 with ``allow_neg_eigval``)."""
    if allow_neg_eigval and not sigmoid:
        raise FlaArgumentError(f"{op}: allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (as in fla).")
    beta = jnp.ones(q.shape[:3], jnp.promote_types(q.dtype, jnp.float32)) if beta is None else jnp.asarray(beta)
    if beta.ndim == 4:
        raise FlaArgumentError(
            f"{op}(beta=...): got shape {beta.shape}, a beta per value channel ([B, T, H, V]); a design model "
            "observes every value column with one precision (its covariance is shared by the columns), so this "
            "is not representable; accepted: beta [B, T, H].")
    if sigmoid:
        beta = jax.nn.sigmoid(beta.astype(jnp.promote_types(beta.dtype, jnp.float32))) * (2.0 if allow_neg_eigval else 1.0)
    return beta


def _gdn_decay(op: str, g, use_gate_in_kernel: bool, A_log, dt_bias):  # noqa: N803 (fla's names)
    """fla's ``g``: a log decay, or with ``use_gate_in_kernel`` the raw gate of ``-exp(A_log) softplus(g + dt_bias)``."""
    if not use_gate_in_kernel:
        return g
    if A_log is None or g is None:
        raise FlaArgumentError(f"{op}: use_gate_in_kernel=True needs g (the raw gate) and A_log [H] (as in fla).")
    g = jnp.asarray(g)
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    if dt_bias is not None:
        g = g + jnp.asarray(dt_bias, g.dtype)
    return -jnp.exp(jnp.asarray(A_log, g.dtype)) * jax.nn.softplus(g)


def _no_value_decay(op: str, gv) -> None:
    if gv is not None:
        raise FlaArgumentError(
            f"{op}(gv=...): a decay over the value dimension (S_t = S_(t-1) diag(exp(gv_t)) ...) is not a "
            "transition of a design model, whose transition acts on the key side of S [K, V]; accepted: gv=None "
            "(decays over keys: g or gk).")


def _run(op: str, model: dm.DesignModel, backend: str, q, k, v, *, scale, initial_state, output_final_state,
         l2norm: bool = False, state_v_first: bool = False, reverse: bool = False, grouped_values: bool = False,
         validate: bool = True, options: dict, **gates):
    """The one call behind every op: fla's conventions -> ``filters.compile(model, backend)(...)``.

    ``o_t = S_t^T (scale q_t)``: the filter reads out with ``scale q``. ``grouped_values``: fla's grouped
    value attention (``v`` with ``HV`` heads, a multiple of the ``H`` of ``q, k``: value head ``j`` reads
    query/key head ``j // (HV / H)``). ``reverse``: the recursion from ``t = T - 1`` down to 0."""
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise FlaArgumentError(f"{op}: {name} has shape {x.shape}; expected [B, T, H, D] (fla's layout).")
    out_dtype = q.dtype
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q = (q.astype(jnp.promote_types(q.dtype, jnp.float32)) * scale).astype(q.dtype)
    if grouped_values and v.shape[2] != q.shape[2]:
        if v.shape[2] % q.shape[2]:
            raise FlaArgumentError(f"{op}: v has {v.shape[2]} heads, q and k {q.shape[2]}; grouped value "
                                   "attention needs a multiple (as in fla).")
        q, k = (jnp.repeat(x, v.shape[2] // q.shape[2], axis=2) for x in (q, k))
    if initial_state is not None and state_v_first:
        initial_state = jnp.swapaxes(jnp.asarray(initial_state), -1, -2)
    gates = {name: x for name, x in gates.items() if x is not None}
    if reverse:
        q, k, v = (jnp.flip(x, axis=1) for x in (q, k, v))
        gates = {name: jnp.flip(jnp.asarray(x), axis=1) for name, x in gates.items()}
    y, state = _compile(model, backend, **options)(q, k, v, initial_state=initial_state, validate=validate, **gates)
    if reverse:
        y = jnp.flip(y, axis=1)
    final = None
    if output_final_state:
        final = jnp.swapaxes(state.mean, -1, -2) if state_v_first else state.mean
    return y.astype(out_dtype), final


# ----------------------------------------------------------------------------------------------------
# Gated DeltaNet
# ----------------------------------------------------------------------------------------------------

def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, *, use_gate_in_kernel=False, A_log=None,  # noqa: N803
                           dt_bias=None, backend="auto", validate=True, **kwargs):
    """Gated DeltaNet, ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``a_t = exp(g_t)``,
    ``o_t = S_t^T (scale q_t)`` (`designmodels.gated_deltanet`).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` (``HV`` a multiple of ``H``: grouped value attention).
      g: log decays ``[B, T, HV]`` (``<= 0``); with ``use_gate_in_kernel``, the raw gate of
        ``-exp(A_log) softplus(g + dt_bias)`` (``A_log``, ``dt_bias`` ``[HV]``).
      beta: write strengths ``[B, T, HV]`` with ``0 <= beta |k|^2 < 1``; with
        ``use_beta_sigmoid_in_kernel``, logits of ``sigmoid`` (``2 sigmoid`` with ``allow_neg_eigval``).
      scale: the readout scale (default ``K ** -0.5``).
      initial_state: ``S_0 [B, HV, K, V]`` (``[B, HV, V, K]`` with ``state_v_first``).
      output_final_state: return ``S_T`` too.
      use_qk_l2norm_in_kernel: L2-normalize ``q`` and ``k`` first (``x / sqrt(|x|^2 + 1e-6)``).

    Returns:
      ``(o [B, T, HV, V], final_state or None)``.
    """
    beta = _beta("chunk_gated_delta_rule", beta, q, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return _run("chunk_gated_delta_rule", GATED_DELTANET, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, l2norm=use_qk_l2norm_in_kernel, state_v_first=state_v_first,
                grouped_values=True, validate=validate,
                options=_check_options("chunk_gated_delta_rule", cu_seqlens, kwargs),
                log_decay=_gdn_decay("chunk_gated_delta_rule", g, use_gate_in_kernel, A_log, dt_bias), beta=beta)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,  # noqa: N803
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                                     cu_seqlens=None, *, backend="sequential", validate=True, **kwargs):
    """Gated DeltaNet step by step (as `chunk_gated_delta_rule`); ``g`` and ``gk`` are optional: a scalar
    decay ``exp(g_t)`` and a channel-wise one ``diag(exp(gk_t))`` over keys (``[B, T, HV, K]``) multiply,
    ``S_t = D_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` with ``D_t = exp(g_t) diag(exp(gk_t))``
    (neither: DeltaNet). ``beta`` defaults to ones, which unit keys make a full overwrite: not
    representable (give ``beta < 1``). ``gv`` (a decay over values) is not a design model.

    Returns:
      ``(o [B, T, HV, V], final_state or None)``.
    """
    op = "fused_recurrent_gated_delta_rule"
    _no_value_decay(op, gv)
    g = _gdn_decay(op, g, use_gate_in_kernel, A_log, dt_bias)
    beta = _beta(op, beta, q, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    if gk is not None:
        model, decay = GATED_DELTANET_CHANNELWISE, jnp.asarray(gk) + (0.0 if g is None else jnp.asarray(g)[..., None])
    else:
        model, decay = (DELTANET, None) if g is None else (GATED_DELTANET, g)
    return _run(op, model, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, l2norm=use_qk_l2norm_in_kernel, state_v_first=state_v_first,
                grouped_values=True, validate=validate, options=_check_options(op, cu_seqlens, kwargs),
                log_decay=decay, beta=beta)


# ----------------------------------------------------------------------------------------------------
# DeltaNet
# ----------------------------------------------------------------------------------------------------

def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="auto", validate=True, **kwargs):
    """DeltaNet, ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = S_t^T (scale q_t)``
    (`designmodels.deltanet`); ``beta [B, T, H]`` with ``0 <= beta |k|^2 < 1``. Arguments as
    `chunk_gated_delta_rule`.

    Returns:
      ``(o [B, T, H, V], final_state or None)``.
    """
    return _run("chunk_delta_rule", DELTANET, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, l2norm=use_qk_l2norm_in_kernel, validate=validate,
                options=_check_options("chunk_delta_rule", cu_seqlens, kwargs),
                beta=_beta("chunk_delta_rule", beta, q, False, False))


def fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="sequential",
                               validate=True, **kwargs):
    """DeltaNet step by step (as `chunk_delta_rule`); ``beta`` defaults to ones (with unit keys a full
    overwrite, not representable: give ``beta < 1``).

    Returns:
      ``(o [B, T, H, V], final_state or None)``.
    """
    return _run("fused_recurrent_delta_rule", DELTANET, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, l2norm=use_qk_l2norm_in_kernel, validate=validate,
                options=_check_options("fused_recurrent_delta_rule", cu_seqlens, kwargs),
                beta=_beta("fused_recurrent_delta_rule", beta, q, False, False))


# ----------------------------------------------------------------------------------------------------
# simple GLA (a scalar decay per head)
# ----------------------------------------------------------------------------------------------------

def _simple_gla_decay(g, g_gamma):
    """``g [B, T, H]`` and ``g_gamma [H]`` add up (fla's kernels add them); neither: linear attention."""
    if g is None and g_gamma is None:
        return LINEAR_ATTENTION, None
    if g_gamma is None:
        return SIMPLE_GLA, g
    gamma = jnp.asarray(g_gamma)
    return SIMPLE_GLA, gamma if g is None else jnp.asarray(g) + gamma


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, *, backend="auto", validate=True, **kwargs):
    """Simple GLA (RetNet, Mamba-2's SSD with ``k = B``, ``q = C``), ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``: a scalar decay per head, ``g [B, T, H]`` (``<= 0``) and/or a fixed
    ``g_gamma [H]``.

    Returns:
      ``(o [B, T, H, V], final_state or None)``.
    """
    model, decay = _simple_gla_decay(g, g_gamma)
    if decay is not None and decay.ndim == 1:       # g_gamma alone: the same decay at every step
        decay = jnp.broadcast_to(decay, q.shape[:3])
    return _run("chunk_simple_gla", model, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first, validate=validate,
                options=_check_options("chunk_simple_gla", cu_seqlens, kwargs), log_decay=decay)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None, *,
                               backend="sequential", validate=True, **kwargs):
    """Simple GLA step by step (as `chunk_simple_gla`); ``reverse=True`` runs from ``t = T - 1`` to 0.

    Returns:
      ``(o [B, T, H, V], final_state or None)``.
    """
    model, decay = _simple_gla_decay(g, g_gamma)
    if decay is not None and decay.ndim == 1:
        decay = jnp.broadcast_to(decay, q.shape[:3])
    return _run("fused_recurrent_simple_gla", model, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first, reverse=reverse,
                validate=validate, options=_check_options("fused_recurrent_simple_gla", cu_seqlens, kwargs),
                log_decay=decay)


# ----------------------------------------------------------------------------------------------------
# GLA (a decay per key channel)
# ----------------------------------------------------------------------------------------------------

def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, *, backend="auto", validate=True, **kwargs):
    """GLA, ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)`` (`designmodels.gla`);
    ``g [B, T, H, K]`` (``<= 0``).

    Returns:
      ``(o [B, T, H, V], final_state or None)``.
    """
    return _run("chunk_gla", GLA, backend, q, k, v, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, state_v_first=state_v_first, validate=validate,
                options=_check_options("chunk_gla", cu_seqlens, kwargs), log_decay=g)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None, *, backend="sequential", validate=True,
                        **kwargs):
    """GLA step by step (as `chunk_gla`, the decay named ``gk``; without it, linear attention);
    ``reverse=True`` runs from ``t = T - 1`` to 0. ``gv`` (a decay over values) is not a design model.

    Returns:
      ``(o [B, T, H, V], final_state or None)``.
    """
    _no_value_decay("fused_recurrent_gla", gv)
    return _run("fused_recurrent_gla", LINEAR_ATTENTION if gk is None else GLA, backend, q, k, v, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, state_v_first=state_v_first,
                reverse=reverse, validate=validate, options=_check_options("fused_recurrent_gla", cu_seqlens, kwargs),
                log_decay=gk)
