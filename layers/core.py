"""The design layer's mathematics, once: pure functions of a parameter tree.

Both Flax front ends are thin wrappers over this module: `layers.DesignLayer` (linen) and
`layers.nnx.DesignLayer` (NNX) create the parameters that `parameter_tree` lists, under the same names
and with the same initializers, and call `forward` and `step`; neither holds any mathematics of its
own. A parameter tree of one therefore runs in the other unchanged (`layers.nnx.DesignLayer.from_linen`,
`layers.nnx.DesignLayer.linen_variables`).

::

    x [B,T,D] -> q, k, v = x W_q, x W_k, x W_v -> (short causal conv + SiLU) -> (L2-normalized q, k)
              -> gates declared by the model (`gates`)
              -> filter (any backend) -> per-head RMSNorm -> output gate SiLU(x W_g) -> x W_out

Parameter tree (``H`` heads, ``K``/``V`` per head, ``C`` the convolution size)::

    q_proj/kernel [D, H K]   k_proj/kernel [D, H K]   v_proj/kernel [D, H V]
    {q,k,v}_conv/kernel [C, H K or H V]               (conv_size > 0)
    gates/...                                         (`gate_parameter_tree`: a head per run-time input)
    norm/scale [V]                                    (output_norm)
    gate_proj/kernel [D, H V]                         (output_gate)
    out_proj/kernel [H V, D]

Every parameter is float32; products run in the layer's ``dtype``, the filter in float32 (or float64).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

import designmodels as dm
import filters
from designmodels import Domain
from designmodels.packaging import require_sibling
from filters import shapes

require_sibling(filters)   # a shadowing module of that name fails here, by name


class LayerError(ValueError):
    """A layer built with impossible attributes, or called on an input of the wrong shape or dtype."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape and its initializer ``init(key, shape, dtype)`` (a `jax.nn.initializers`
    function). Parameters are float32 whatever ``jax_enable_x64`` says."""

    shape: tuple
    init: Callable

    def create(self, key) -> jax.Array:
        return self.init(key, self.shape, jnp.float32)


# ----------------------------------------------------------------------------------------------------
# the attributes
# ----------------------------------------------------------------------------------------------------

def _positive_int(owner: str, field: str, value, *, zero: bool = False) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and (value >= 0 if zero else value >= 1)
    if not ok:
        raise LayerError(f"{owner}.{field}: got {value!r}; accepted: an integer {'>= 0' if zero else '>= 1'}.")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The attributes of a design layer, checked once; both wrappers hold one.

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
      dtype: the dtype of the products (parameters stay float32).
      chunk_size: the chunk length of the chunked and pallas lowerings (None: theirs, 64); checked by
        `filters.compile` as its option of that name.
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
    chunk_size: Optional[int] = None

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
        if self.chunk_size is not None:
            _ = self.filter                      # the lowering's own check of the chunk size, now

    @property
    def values_per_head(self) -> int:
        return self.value_dim or self.key_dim

    @property
    def normalize(self) -> bool:
        return self.model.family != "additive" if self.normalize_qk is None else self.normalize_qk

    @property
    def filter(self) -> filters.Filter:
        options = {} if self.chunk_size is None else {"chunk_size": self.chunk_size}
        return filters.compile(self.model, backend=self.backend, **options)   # cached per (model, backend, options)

    def attributes(self) -> dict:
        """Every attribute by name (not `dataclasses.asdict`, which would copy the design model)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


# ----------------------------------------------------------------------------------------------------
# the parameters
# ----------------------------------------------------------------------------------------------------

_KERNEL = jax.nn.initializers.lecun_normal()     # flax's Dense default, so trees match nn.Dense / nnx.Linear
_ZEROS = jax.nn.initializers.zeros
_ONES = jax.nn.initializers.ones
_CONV_KERNEL = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=1)


def _dense(d_in: int, d_out: int, bias: bool = True) -> dict:
    tree = {"kernel": ParamSpec((d_in, d_out), _KERNEL)}
    if bias:
        tree["bias"] = ParamSpec((d_out,), _ZEROS)
    return tree


def _dt_bias_init(dt_min=1e-3, dt_max=0.1):
    """Mamba-2's init: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``."""
    def init(key, shape, dtype=jnp.float32):
        dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min))
                     + math.log(dt_min))
        return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    return init


# The projection of the token into dt starts small (fla's GatedDeltaNet and Mamba-2 models initialize every
# Linear, its a_proj included, from N(0, 0.02^2)): at init ``dt = softplus(x W + dt_bias)`` is then the
# documented ``softplus(dt_bias)`` up to a small token-dependent factor. With the Dense default (lecun_normal,
# ``x W ~ N(0, 1)`` for a LayerNorm'd ``x``) the mean dt was ``e^{1/2} = 1.65`` times it (Jensen, as
# ``softplus(b + z) ~ e^{b + z}`` for small dt), and the heads that keep a key over 112 tokens at init halved
# (13% against fla's 26%): the diagnosis of Gated DeltaNet on MQAR in docs/results/mqar/README.md.
_DT_KERNEL = jax.nn.initializers.normal(0.02)


def _a_log_init(key, shape, dtype=jnp.float32):
    """Mamba-2's ``A = -exp(A_log)`` with ``exp(A_log)`` uniform in ``[1, 16]``."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1, 16))


def _inputs_by_domain(model: dm.DesignModel) -> dict:
    """``{(Domain, trailing shape): input name}`` of the run-time inputs the model declares: the gate heads
    are chosen by what an input *is* (its typed domain), never by its name or its message."""
    return {(spec.domain, spec.trailing): spec.name for spec in model.structure.inputs}


_SCALAR_DECAY, _CHANNEL_DECAY = (Domain.LOG_DECAY, ()), (Domain.LOG_DECAY, ("K",))
_INPUT_SCALE, _WRITE_STRENGTH = (Domain.INPUT_SCALE, ()), (Domain.WRITE_STRENGTH, ())
_PRECISION, _PROCESS_NOISE, _TRANSITION = (Domain.PRECISION, ()), (Domain.PROCESS_NOISE, ()), \
    (Domain.TRANSITION, ("K", "K"))
_HANDLED = {_SCALAR_DECAY, _CHANNEL_DECAY, _INPUT_SCALE, _WRITE_STRENGTH, _PRECISION, _PROCESS_NOISE, _TRANSITION}


def gate_parameter_tree(model: dm.DesignModel, num_heads: int, key_dim: int, d_in: int) -> dict:
    """The parameters of the gate heads for the run-time inputs ``model`` declares (see `gates`), in the
    order the linen layer has always created them (so that its initialization is unchanged)."""
    domain = _inputs_by_domain(model)
    missing = [name for kind, name in domain.items() if kind not in _HANDLED]
    if missing:  # every domain above is handled; a new one must be given a parameterization
        raise NotImplementedError(f"Gates: no parameterization for run-time inputs {missing}.")
    tree = {}
    if _SCALAR_DECAY in domain or _INPUT_SCALE in domain:
        tree["dt_proj"] = {"kernel": ParamSpec((d_in, num_heads), _DT_KERNEL)}
        tree["dt_bias"] = ParamSpec((num_heads,), _dt_bias_init())
        if _SCALAR_DECAY in domain:
            tree["A_log"] = ParamSpec((num_heads,), _a_log_init)
    if _CHANNEL_DECAY in domain:
        tree["decay_proj"] = _dense(d_in, num_heads * key_dim)
    if _WRITE_STRENGTH in domain or _PRECISION in domain:
        tree["beta_proj"] = _dense(d_in, num_heads)
    if _PROCESS_NOISE in domain:
        tree["noise_proj"] = _dense(d_in, num_heads)
    if _TRANSITION in domain:
        tree["transition_proj"] = _dense(d_in, num_heads * key_dim * key_dim)
    return tree


def parameter_tree(spec: LayerSpec) -> dict:
    """Every parameter of the layer (see the module docstring), as nested dicts of `ParamSpec`."""
    d, heads, kd, vd = spec.d_model, spec.num_heads, spec.key_dim, spec.values_per_head
    tree = {"q_proj": _dense(d, heads * kd, bias=False), "k_proj": _dense(d, heads * kd, bias=False),
            "v_proj": _dense(d, heads * vd, bias=False)}
    if spec.conv_size:
        for name, width in (("q_conv", heads * kd), ("k_conv", heads * kd), ("v_conv", heads * vd)):
            tree[name] = {"kernel": ParamSpec((spec.conv_size, width), _CONV_KERNEL)}
    gate_tree = gate_parameter_tree(spec.model, heads, kd, d)
    if gate_tree:                                    # linen creates no scope for a module without parameters
        tree["gates"] = gate_tree
    if spec.output_norm:
        tree["norm"] = {"scale": ParamSpec((vd,), _ONES)}
    if spec.output_gate:
        tree["gate_proj"] = _dense(d, heads * vd, bias=False)
    tree["out_proj"] = _dense(heads * vd, d, bias=False)
    return tree


# ----------------------------------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------------------------------

def dense(params: Mapping, x, dtype) -> jax.Array:
    """``x W (+ b)`` over the last axis of ``x``, in ``dtype`` (as ``flax.linen.Dense`` computes it)."""
    kernel = jnp.asarray(params["kernel"], dtype)
    x = jnp.asarray(x, dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if "bias" in params:
        y = y + jnp.reshape(jnp.asarray(params["bias"], dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def short_conv(kernel, x, history=None, positions=None):
    """Depthwise causal convolution over time, ``y_t = SiLU(sum_i w_i x_{t - C + 1 + i})``.

    ``kernel [C, channels]``, ``x [B, T, channels]``, ``history [B, C - 1, channels]`` (the previous inputs;
    zeros at the start). ``positions [T]``: for a packed row (`filters.packed`), each step's position in
    its own sequence; a term that reaches back past that sequence's start (``C - 1 - i > positions_t``)
    is dropped, as if the sequence were alone (zero history). Returns ``(y, new_history)``."""
    size, channels = kernel.shape
    if history is None:
        history = jnp.zeros((x.shape[0], size - 1, channels), x.dtype)
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    time = x.shape[1]
    terms = [padded[:, i:i + time] * kernel[i].astype(x.dtype) for i in range(size)]
    if positions is not None:   # term i reads the input C - 1 - i steps back
        terms = [jnp.where((size - 1 - i <= positions)[None, :, None], term, 0) for i, term in enumerate(terms)]
    return jax.nn.silu(sum(terms)), padded[:, time:]


def rms_norm(scale, y, dtype, epsilon: float = 1e-6):
    """``y / sqrt(mean(y^2) + epsilon) * scale`` over the last axis, the statistics in at least float32
    (as ``flax.linen.RMSNorm`` computes it)."""
    stats = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    var = jnp.mean(jax.lax.square(stats), axis=-1, keepdims=True)
    return jnp.asarray(y * (jax.lax.rsqrt(var + epsilon) * scale), dtype)


def gates(model: dm.DesignModel, params: Mapping, x, *, num_heads: int, key_dim: int, beta_min: float = 1e-2,
          beta_max: float = 16.0, gate_logit_normalizer: float = 16.0) -> dict:
    """``x [..., D] -> {name: gate [..., H, ...]}`` for the model's declared run-time inputs (float32).

    Each declared input gets the parameterization of the architecture that made it known, chosen from the
    input's typed domain (`designmodels.Domain`), so every output is valid by construction:

    * scalar ``log_decay``: ``-exp(A_log) * softplus(x W + dt_bias)`` (Mamba-2, Gated DeltaNet), in
      ``(-inf, 0)``;
    * ``input_scale``: ``softplus(x W + dt_bias)``, Mamba-2's ``dt``, shared with the decay when both are
      declared (``log_decay = dt * A``), ``> 0``;
    * diagonal ``log_decay``: ``log_sigmoid(x W + b) / gate_logit_normalizer`` (GLA's low-temperature gate);
    * ``beta`` as a write strength: ``sigmoid(x W + b)`` (DeltaNet), in ``(0, 1)``: with unit keys
      ``beta |k|^2 < 1``;
    * ``beta`` as a precision: ``beta_min + (beta_max - beta_min) sigmoid(x W + b)``, bounded, which keeps
      the chunked factorizations well conditioned;
    * ``process_noise``: ``softplus(x W + b - 4)`` (starts small: about 0.018);
    * dense ``transition``: ``Z / max(1, ||Z||_F)``, ``Z = I + (x W + b)`` reshaped to ``K x K``, so
      ``||A|| <= 1``.
    """
    domain = _inputs_by_domain(model)
    lead = x.shape[:-1]
    head = lambda name: dense(params[name], x, x.dtype).astype(jnp.float32)
    out = {}
    if _SCALAR_DECAY in domain or _INPUT_SCALE in domain:
        dt = jax.nn.softplus(head("dt_proj") + params["dt_bias"])
        if _INPUT_SCALE in domain:
            out[domain[_INPUT_SCALE]] = dt
        if _SCALAR_DECAY in domain:
            out[domain[_SCALAR_DECAY]] = -jnp.exp(params["A_log"]) * dt
    if _CHANNEL_DECAY in domain:
        logits = head("decay_proj").reshape(*lead, num_heads, key_dim)
        out[domain[_CHANNEL_DECAY]] = jax.nn.log_sigmoid(logits) / gate_logit_normalizer
    if _WRITE_STRENGTH in domain:
        out[domain[_WRITE_STRENGTH]] = jax.nn.sigmoid(head("beta_proj"))
    if _PRECISION in domain:
        out[domain[_PRECISION]] = beta_min + (beta_max - beta_min) * jax.nn.sigmoid(head("beta_proj"))
    if _PROCESS_NOISE in domain:
        out[domain[_PROCESS_NOISE]] = jax.nn.softplus(head("noise_proj") - 4.0)
    if _TRANSITION in domain:
        z = head("transition_proj").reshape(*lead, num_heads, key_dim, key_dim) + jnp.eye(key_dim)
        norm = jnp.sqrt(jnp.sum(z * z, axis=(-2, -1), keepdims=True))
        out[domain[_TRANSITION]] = z / jnp.maximum(1.0, norm)
    return out


# ----------------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------------

def check_input(spec: LayerSpec, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or len(x.shape) != rank or x.shape[-1] != spec.d_model:
        got = f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
        raise LayerError(f"x: got {got}; expected {layout} with D = d_model = {spec.d_model}"
                         + ("." if rank == 3 else " (one decoding step; the whole sequence goes to __call__)."))
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise LayerError(f"x: got dtype {x.dtype}; accepted: a floating dtype (embed token ids first, e.g. "
                         "with nn.Embed).")


@shapes.typed
def features(spec: LayerSpec, params: Mapping, x: shapes.Activations, conv_cache=None, positions=None
             ) -> tuple[shapes.Queries, shapes.Keys, shapes.Values, dict, Any]:
    """Projections, convolution and normalization: ``q, k [B,T,H,K]``, ``v [B,T,H,V]`` (float32), the
    gates, and the convolution's new history (None without a convolution). ``positions [T]``: a packed
    row's positions in their sequences (`short_conv`)."""
    heads = spec.num_heads
    q, k, v = (dense(params[name], x, spec.dtype) for name in ("q_proj", "k_proj", "v_proj"))
    new_conv = None
    if spec.conv_size:
        conv_cache = conv_cache or (None, None, None)
        (q, hq), (k, hk), (v, hv) = (short_conv(params[name]["kernel"], z, h, positions) for name, z, h in zip(
            ("q_conv", "k_conv", "v_conv"), (q, k, v), conv_cache))
        new_conv = (hq, hk, hv)
    # explicit sizes, not -1: reshape cannot infer a dimension of an empty array (a batch of 0)
    split = lambda z: z.reshape(*z.shape[:-1], heads, z.shape[-1] // heads).astype(jnp.float32)
    q, k, v = split(q), split(k), split(v)
    if spec.normalize:
        unit = lambda z: z * jax.lax.rsqrt(jnp.sum(z * z, -1, keepdims=True) + 1e-6)
        q, k = unit(q), unit(k)
    else:
        q = q * spec.key_dim ** -0.5
    gate_values = gates(spec.model, params.get("gates", {}), x, num_heads=heads, key_dim=spec.key_dim)
    return q, k, v, gate_values, new_conv


@shapes.typed
def output(spec: LayerSpec, params: Mapping, x: shapes.SteppedActivations, y: shapes.SteppedValues
           ) -> shapes.SteppedActivations:
    """Per-head RMSNorm, the output gate ``SiLU(x W_g)`` and the output projection of the readout ``y``."""
    if spec.output_norm:
        y = rms_norm(params["norm"]["scale"], y, spec.dtype)
    y = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1]).astype(spec.dtype)
    if spec.output_gate:
        y = y * jax.nn.silu(dense(params["gate_proj"], x, spec.dtype))
    return dense(params["out_proj"], y, spec.dtype)


def forward(spec: LayerSpec, params: Mapping, x, cache=None, *, return_cache: bool = False, cu_seqlens=None,
            max_seqlen: Optional[int] = None):
    """``x [B, T, D] -> y [B, T, D]``; with ``return_cache`` also the cache for decoding onwards,
    ``{"filter": FilterState, "conv": (q, k, v) histories}``. A ``cache`` continues a sequence.

    ``cu_seqlens``: ``x [1, T, D]`` is a packed row of sequences laid end to end (`filters.packed`);
    neither the convolution nor the filter reaches across a boundary, so each sequence's outputs are
    those it has alone. ``max_seqlen`` as `filters.Filter` takes it (required under ``jit``)."""
    check_input(spec, x, 3, "[B, T, D]")
    positions = None
    if cu_seqlens is not None:
        if cache is not None or return_cache:
            raise LayerError("cu_seqlens: a packed row is filtered from the prior and returns no decoding cache "
                             "(one per sequence is not built yet); accepted: cache=None and return_cache=False "
                             "with cu_seqlens, or a padded batch [B, T, D] for decoding.")
        # the values are checked here, once per layer call (the filter below trusts them, validate=False)
        cu, max_seqlen = filters.packed.check_cu_seqlens(cu_seqlens, batch=x.shape[0], total=x.shape[1],
                                                         max_seqlen=max_seqlen, name="x")
        positions = filters.packed.positions(cu, x.shape[1])[1]
    cache = cache or {}
    q, k, v, gate_values, conv = features(spec, params, x, cache.get("conv"), positions)
    packing = {} if cu_seqlens is None else {"cu_seqlens": cu, "max_seqlen": max_seqlen}
    y, state = spec.filter(q, k, v, initial_state=cache.get("filter"), validate=False, **packing, **gate_values)
    out = output(spec, params, x, y)
    return (out, {"filter": state, "conv": conv}) if return_cache else out


def step(spec: LayerSpec, params: Mapping, x, cache=None):
    """One decoding step: ``x [B, D] -> (y [B, D], cache)``; equal to `forward` one token at a time."""
    check_input(spec, x, 2, "[B, D]")
    cache = cache or {}
    q, k, v, gate_values, conv = features(spec, params, x[:, None], cache.get("conv"))
    y, state = spec.filter.step(cache.get("filter"), q[:, 0], k[:, 0], v[:, 0], validate=False,
                                **{n: g[:, 0] for n, g in gate_values.items()})
    return output(spec, params, x, y), {"filter": state, "conv": conv}


def readout_weights(spec: LayerSpec, params: Mapping, x) -> jax.Array:
    """The filter's readout as weights on its values: ``W [B, H, T, T]`` with ``y_t = sum_s W[t, s] v_s``
    per head (the filter's output, before the norm, the output gate and the projection; from a zero
    state, so ``W[t, s] = 0`` for ``s > t``).

    Given the queries, keys and gates (which do not depend on ``v``), every family's readout is linear
    in the values with one scalar weight per pair of steps: additive, ``S_t = sum_s D_{t,s} k_s v_s^T``
    with the decays ``D_{t,s}`` between the steps; reset and exact, ``S_t = G_t S_{t-1} + Kg_t v_t^T``
    with ``G_t``, ``Kg_t`` computed from keys and gates only (DESIGN.md section 2), so
    ``W[t, s] = q_t^T G_t ... G_{s+1} Kg_s``. Hence ``W`` is the readout of the filter run on the values
    ``v_s = e_s``, the identity over time (value dimension ``T``). `memory_span` summarizes it."""
    check_input(spec, x, 3, "[B, T, D]")
    q, k, _, gate_values, _ = features(spec, params, x)
    time = x.shape[1]
    eye = jnp.broadcast_to(jnp.eye(time, dtype=q.dtype)[None, :, None, :], (*k.shape[:-1], time))
    y, _ = spec.filter(q, k, eye, validate=False, **gate_values)          # [B, T(t), H, T(s)]
    return jnp.transpose(y, (0, 2, 1, 3))


def memory_span(weights, start: int = 0) -> dict:
    """Summaries, per head, of readout weights ``W [B, H, T, T]`` (`readout_weights`) over the
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
