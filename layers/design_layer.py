"""`DesignLayer`: one Flax layer for every design model.

::

    x [B,T,D] -> q, k, v projections -> (short causal conv + SiLU) -> (L2-normalized q, k)
              -> gates declared by the model (`layers.gates`)
              -> filter (any backend) -> per-head RMSNorm -> output gate SiLU(x W_g) -> out projection

Keys are L2-normalized for the reset and exact families: a write strength is then a reset exactly when
it is below one, and a precision bounds the write gain away from one. Decoding uses a cache
``{"filter": FilterState, "conv": (q, k, v) buffers}`` and equals the parallel form.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import designmodels as dm
import filters
from layers.gates import Gates


class LayerError(ValueError):
    """A layer built with impossible attributes, or called on an input of the wrong shape or dtype."""


def _positive_int(owner: str, field: str, value, *, zero: bool = False) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and (value >= 0 if zero else value >= 1)
    if not ok:
        raise LayerError(f"{owner}.{field}: got {value!r}; accepted: an integer {'>= 0' if zero else '>= 1'}.")


class ShortConv(nn.Module):
    """Depthwise causal convolution over time, ``y_t = sum_i w_i x_{t - size + 1 + i}``, then SiLU."""

    size: int

    @nn.compact
    def __call__(self, x, history=None):
        """``x [B, T, C]``, ``history [B, size - 1, C]`` (the previous inputs; zeros at the start).
        Returns ``(y, new_history)``."""
        channels = x.shape[-1]
        weight = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1), (self.size, channels),
                            jnp.float32)
        if history is None:
            history = jnp.zeros((x.shape[0], self.size - 1, channels), x.dtype)
        padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        time = x.shape[1]
        y = sum(padded[:, i:i + time] * weight[i].astype(x.dtype) for i in range(self.size))
        return jax.nn.silu(y), padded[:, time:]


class DesignLayer(nn.Module):
    """A sequence layer derived from a design model.

    Attributes:
      model: the design model (any `designmodels.DesignModel`).
      d_model: input and output width ``D``.
      num_heads: ``H``; ``key_dim`` ``K`` and ``value_dim`` ``V`` are per head (``value_dim`` defaults to
        ``key_dim``).
      backend: a `filters.compile` backend.
      conv_size: short causal convolution over q, k, v (0 disables).
      normalize_qk: L2-normalize q and k; None: yes for the reset and exact families, no for additive
        (whose queries are then scaled by ``K^-1/2``).
      output_gate, output_norm: the SiLU output gate and the per-head RMSNorm.
    """

    model: dm.DesignModel
    d_model: int
    num_heads: int = 4
    key_dim: int = 32
    value_dim: Optional[int] = None
    backend: str = "auto"
    conv_size: int = 4
    normalize_qk: Optional[bool] = None
    output_gate: bool = True
    output_norm: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self):
        if not isinstance(self.model, dm.DesignModel):
            hint = (f"; for the named model write dm.NAMED_MODELS[{self.model!r}]() or layers.named_layer"
                    if isinstance(self.model, str) and self.model in dm.NAMED_MODELS else "")
            raise LayerError(f"DesignLayer.model: got {type(self.model).__name__} {self.model!r:.80}; accepted: a "
                             f"designmodels.DesignModel{hint}.")
        for field in ("d_model", "num_heads", "key_dim"):
            _positive_int("DesignLayer", field, getattr(self, field))
        if self.value_dim is not None:
            _positive_int("DesignLayer", "value_dim", self.value_dim)
        _positive_int("DesignLayer", "conv_size", self.conv_size, zero=True)
        fixed = self.model.key_dim
        if fixed is not None and fixed != self.key_dim:
            raise LayerError(f"DesignLayer.key_dim: got {self.key_dim}, but the design model fixes K = {fixed} "
                             f"(its prior covariance or transition has that size); accepted: key_dim={fixed}.")
        super().__post_init__()

    def _check_input(self, x, rank: int, layout: str):
        if not hasattr(x, "shape") or len(x.shape) != rank or x.shape[-1] != self.d_model:
            got = f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
            raise LayerError(f"x: got {got}; expected {layout} with D = d_model = {self.d_model}"
                             + ("." if rank == 3 else " (one decoding step; the whole sequence goes to __call__)."))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise LayerError(f"x: got dtype {x.dtype}; accepted: a floating dtype (embed token ids first, e.g. "
                             "with nn.Embed).")

    def setup(self):
        heads, kd, vd = self.num_heads, self.key_dim, self.value_dim or self.key_dim
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
        self.q_proj, self.k_proj, self.v_proj = dense(heads * kd, "q_proj"), dense(heads * kd, "k_proj"), \
            dense(heads * vd, "v_proj")
        if self.conv_size:
            self.q_conv, self.k_conv, self.v_conv = (ShortConv(self.conv_size, name=f"{n}_conv") for n in "qkv")
        self.gates = Gates(self.model, heads, kd, name="gates")
        if self.output_norm:
            self.norm = nn.RMSNorm(dtype=self.dtype, name="norm")
        if self.output_gate:
            self.gate_proj = dense(heads * vd, "gate_proj")
        self.out_proj = dense(self.d_model, "out_proj")
        self.filter = filters.compile(self.model, backend=self.backend)

    @property
    def _normalize(self) -> bool:
        return self.model.family != "additive" if self.normalize_qk is None else self.normalize_qk

    def _features(self, x, conv_cache):
        """Projections, convolution and normalization: ``q, k [B,T,H,K]``, ``v [B,T,H,V]``, gates."""
        heads = self.num_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_conv = None
        if self.conv_size:
            conv_cache = conv_cache or (None, None, None)
            (q, hq), (k, hk), (v, hv) = (conv(z, h) for conv, z, h in zip(
                (self.q_conv, self.k_conv, self.v_conv), (q, k, v), conv_cache))
            new_conv = (hq, hk, hv)
        # explicit sizes, not -1: reshape cannot infer a dimension of an empty array (a batch of 0)
        split = lambda z: z.reshape(*z.shape[:-1], heads, z.shape[-1] // heads).astype(jnp.float32)
        q, k, v = split(q), split(k), split(v)
        if self._normalize:
            unit = lambda z: z * jax.lax.rsqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-6)
            q, k = unit(q), unit(k)
        else:
            q = q * self.key_dim ** -0.5
        return q, k, v, self.gates(x), new_conv

    def _output(self, x, y):
        if self.output_norm:
            y = self.norm(y)
        y = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1]).astype(self.dtype)
        if self.output_gate:
            y = y * jax.nn.silu(self.gate_proj(x))
        return self.out_proj(y)

    def __call__(self, x, cache=None, *, return_cache: bool = False):
        """``x [B, T, D] -> y [B, T, D]``; with ``return_cache`` also the cache for decoding onwards."""
        self._check_input(x, 3, "[B, T, D]")
        cache = cache or {}
        q, k, v, gates, conv = self._features(x, cache.get("conv"))
        y, state = self.filter(q, k, v, initial_state=cache.get("filter"), validate=False, **gates)
        out = self._output(x, y)
        return (out, {"filter": state, "conv": conv}) if return_cache else out

    def readout_weights(self, x):
        """The filter's readout as weights on its values: ``W [B, H, T, T]`` with ``y_t = sum_s W[t, s] v_s``
        per head (the filter's output, before the norm, the output gate and the projection; from a zero
        state, so ``W[t, s] = 0`` for ``s > t``).

        Given the queries, keys and gates (which do not depend on ``v``), every family's readout is linear
        in the values with one scalar weight per pair of steps: additive, ``S_t = sum_s D_{t,s} k_s v_s^T``
        with the decays ``D_{t,s}`` between the steps; reset and exact, ``S_t = G_t S_{t-1} + Kg_t v_t^T``
        with ``G_t``, ``Kg_t`` computed from keys and gates only (DESIGN.md section 2), so
        ``W[t, s] = q_t^T G_t ... G_{s+1} Kg_s``. Hence ``W`` is the readout of the filter run on the values
        ``v_s = e_s``, the identity over time (value dimension ``T``). `memory_span` summarizes it."""
        self._check_input(x, 3, "[B, T, D]")
        q, k, _, gates, _ = self._features(x, None)
        time = x.shape[1]
        eye = jnp.broadcast_to(jnp.eye(time, dtype=q.dtype)[None, :, None, :], (*k.shape[:-1], time))
        y, _ = self.filter(q, k, eye, validate=False, **gates)           # [B, T(t), H, T(s)]
        return jnp.transpose(y, (0, 2, 1, 3))

    def step(self, x, cache=None):
        """One decoding step: ``x [B, D] -> (y [B, D], cache)``."""
        self._check_input(x, 2, "[B, D]")
        cache = cache or {}
        q, k, v, gates, conv = self._features(x[:, None], cache.get("conv"))
        y, state = self.filter.step(cache.get("filter"), q[:, 0], k[:, 0], v[:, 0], validate=False,
                                    **{n: g[:, 0] for n, g in gates.items()})
        return self._output(x, y), {"filter": state, "conv": conv}


def memory_span(weights, start: int = 0) -> dict:
    """Summaries, per head, of readout weights ``W [B, H, T, T]`` (`DesignLayer.readout_weights`) over the
    positions ``t >= start``, each with the absolute weights normalized over ``s <= t``,
    ``w_{t,s} = |W[t, s]| / sum_{s' <= t} |W[t, s']|``:

    * ``mean_lag``: ``E_t sum_s (t - s) w_{t,s}``, how far back the readout looks on average (a memory that
      weighs every step alike looks back ``t / 2``; one that reads only the current step, 0);
    * ``current`` and ``previous``: ``E_t w_{t,t}`` and ``E_t w_{t,t-1}`` (``t >= max(start, 1)``), the
      shares of the current and of the previous step: what a first layer needs to bind a key to the value
      one step later.

    Returns ``{name: numpy [H]}``, averaged over the batch too."""
    w = np.abs(np.asarray(weights, np.float64))
    time = w.shape[-1]
    if not 0 <= start < time:
        raise LayerError(f"memory_span: start={start}; accepted: 0 <= start < T = {time}.")
    w = w / np.maximum(w.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
    t = np.arange(time)
    lag = np.maximum(t[:, None] - t[None, :], 0)
    first = max(start, 1)
    return {"mean_lag": (w * lag).sum(-1)[..., start:].mean((0, 2)),
            "current": w[..., t, t][..., start:].mean((0, 2)),
            "previous": w[..., t[first:], t[first:] - 1].mean((0, 2))}
