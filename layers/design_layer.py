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
from designmodels.packaging import require_sibling
from filters import shapes
from layers.gates import Gates

require_sibling(filters)   # a shadowing module of that name fails here, by name


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

    @shapes.typed
    def _features(self, x: shapes.Activations, conv_cache
                  ) -> tuple[shapes.Queries, shapes.Keys, shapes.Values, dict, Any]:
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

    @shapes.typed
    def _output(self, x: shapes.SteppedActivations, y: shapes.SteppedValues) -> shapes.SteppedActivations:
        if self.output_norm:
            y = self.norm(y)
        y = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1]).astype(self.dtype)
        if self.output_gate:
            y = y * jax.nn.silu(self.gate_proj(x))
        return self.out_proj(y)

    def __call__(self, x: shapes.Activations, cache=None, *, return_cache: bool = False):
        """``x [B, T, D] -> y [B, T, D]``; with ``return_cache`` also the cache for decoding onwards."""
        self._check_input(x, 3, "[B, T, D]")
        cache = cache or {}
        q, k, v, gates, conv = self._features(x, cache.get("conv"))
        y, state = self.filter(q, k, v, initial_state=cache.get("filter"), validate=False, **gates)
        out = self._output(x, y)
        return (out, {"filter": state, "conv": conv}) if return_cache else out

    def step(self, x: shapes.StepActivations, cache=None):
        """One decoding step: ``x [B, D] -> (y [B, D], cache)``."""
        self._check_input(x, 2, "[B, D]")
        cache = cache or {}
        q, k, v, gates, conv = self._features(x[:, None], cache.get("conv"))
        y, state = self.filter.step(cache.get("filter"), q[:, 0], k[:, 0], v[:, 0], validate=False,
                                    **{n: g[:, 0] for n, g in gates.items()})
        return self._output(x, y), {"filter": state, "conv": conv}
