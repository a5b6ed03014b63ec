"""The model of the recall experiments: a small language model whose sequence layer is the one under test.

::

    tokens [B,T] -> embedding (+ W vectors [B,T,F], the learned-recall study)
                 -> n_layers x [ x + mixer(LayerNorm(x)); optionally x + MLP(LayerNorm(x)) ]
                 -> LayerNorm -> tied head (embedding^T) -> logits [B,T,vocab]

The mixer is a `layers.DesignLayer` (a named design model, or any `designmodels.DesignModel` instance:
``LanguageModel(my_model, vocab_size, d_model)`` trains a model of your own) or, as the baseline that is
not a design model, `CausalAttention`. Parameters and activations are float32 whatever the global default.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

import designmodels as dm
import layers
from designmodels.packaging import require_sibling

require_sibling(layers)   # a shadowing module of that name fails here, by name

F32 = jnp.float32

# The layers with their short convolution (``conv_size`` from the config, 4 by default): every design layer
# and attention. name -> (named layer, or "attention"; overrides of the layer's options)
_WITH_CONV: dict[str, tuple[str, dict[str, Any]]] = {
    "attention": ("attention", {}),
    "linear_attention": ("linear_attention", {}),
    "retnet": ("retnet", {}),
    "gla": ("gla", {}),
    "mamba2": ("mamba2", {}),
    "deltanet": ("deltanet", {}),
    "gated_deltanet": ("gated_deltanet", {}),
    "longhorn": ("longhorn", {}),
    # The Bayesian Layer forgets towards its prior: stationary process noise Q_t = (1 - a_t^2) l^2 I beside the
    # decay a_t. With a decay and no noise, P_t = a_t^2 P_{t-1} contracts, the write gain vanishes and the
    # readout is held by the first steps of the sequence (docs/results/mqar/no_conv.md).
    "bayesian": ("bayesian", {"noise": "stationary"}),
}
NO_CONV = "_no_conv"
# The Bayesian Layer of the GPU results committed before 2026-12 (docs/results/mqar, docs/results/recall):
# a decay and no process noise.
LEGACY_BAYESIAN = "bayesian_no_noise"


def _no_conv(kind: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return kind, {**overrides, "conv_size": 0}


# Every model of `_WITH_CONV` also without its convolution (``<name>_no_conv``: ``conv_size = 0`` whatever the
# config says), so that Block-MQAR compares like with like; then the legacy Bayesian Layer with and without.
# "bayesian_no_conv" keeps its place after "bayesian" (the order sets the colours of the figures).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    **_WITH_CONV, "bayesian" + NO_CONV: _no_conv(*_WITH_CONV["bayesian"]),
    **{name + NO_CONV: _no_conv(*entry) for name, entry in _WITH_CONV.items() if name != "bayesian"},
    LEGACY_BAYESIAN: ("bayesian", {}), LEGACY_BAYESIAN + NO_CONV: _no_conv("bayesian", {}),
}


_MODEL_OPTIONS = {"gamma", "prior_variance", "process_noise", "noise", "decay"}


def recorded_options(name: str) -> dict[str, Any]:
    """What a model name of `MODELS` means beyond the config's fields, for a run's identity:
    ``{"layer_options": overrides}`` (e.g. ``bayesian_no_conv``: stationary noise, ``conv_size = 0``), or ``{}``
    for a name without overrides, whose identity is then what it was before names had overrides. A run
    folder of a name made when the name meant another layer (``bayesian`` before its process noise) is thus
    refused, never reused."""
    overrides = MODELS[name][1]
    return {"layer_options": dict(sorted(overrides.items()))} if overrides else {}


def check_models(names) -> None:
    bad = [n for n in names if n not in MODELS]
    if bad:
        hints = "".join(dm.did_you_mean(b, MODELS) for b in bad)
        raise ValueError(f"config.models: {bad} not known{hints}; accepted: {', '.join(MODELS)}.")


def heads_for(d_model: int, head_dim: int) -> tuple[int, int]:
    """``(num_heads, key_dim)``: heads of width ``head_dim`` (one head when ``d_model <= head_dim``)."""
    heads = max(1, d_model // head_dim)
    return heads, d_model // heads


def rope(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding over the last axis of ``x [B, T, H, D]`` (D even; rotate-half form)."""
    time, dim = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, dim // 2, dtype=F32) * 2 / dim)
    angle = jnp.arange(time, dtype=F32)[:, None] * freqs                       # [T, D/2]
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class CausalAttention(nn.Module):
    """Causal multi-head softmax attention (the baseline): q, k, v projections, the same short causal
    convolution as the design layers (``conv_size``, 0 disables), rotary positions, output projection."""

    d_model: int
    num_heads: int = 1
    head_dim: int = 64
    conv_size: int = 4
    use_rope: bool = True

    @nn.compact
    def __call__(self, x):
        batch, time, _ = x.shape
        width = self.num_heads * self.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=F32, param_dtype=F32, name=name)
        q, k, v = dense(width, "q_proj")(x), dense(width, "k_proj")(x), dense(width, "v_proj")(x)
        if self.conv_size:
            q, k, v = (layers.ShortConv(self.conv_size, name=f"{n}_conv")(z)[0] for n, z in zip("qkv", (q, k, v)))
        split = lambda z: z.reshape(batch, time, self.num_heads, self.head_dim).astype(F32)
        q, k, v = split(q), split(k), split(v)
        if self.use_rope:
            q, k = rope(q), rope(k)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) * self.head_dim ** -0.5
        mask = jnp.tril(jnp.ones((time, time), bool))
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, time, width)
        return dense(self.d_model, "out_proj")(y)


def state_size(name: str, d_model: int, *, head_dim: int = 64, num_layers: int = 2, seq_len: int) -> int:
    """The numbers a model of `MODELS` carries per sequence after ``seq_len`` tokens: its recurrent state
    (Zoology's "state size", the x axis of its recall-memory trade-off). Per layer: a design layer's filter
    state, the mean ``S`` (``H x K x V``) and, for the exact family (the Bayesian Layer), the covariance ``P``
    (``H x K x K``); attention's keys and values, ``2 x seq_len x d_model``. The short convolutions' last
    inputs (``3 (conv_size - 1) d_model``) are not counted, as in Zoology."""
    check_models([name])
    kind, overrides = MODELS[name]
    if kind == "attention":
        return num_layers * 2 * seq_len * d_model
    heads, key_dim = heads_for(d_model, head_dim)
    model = dm.NAMED_MODELS[kind](**{k: v for k, v in overrides.items() if k in _MODEL_OPTIONS})
    per_head = key_dim * key_dim + (key_dim * key_dim if model.family == "exact" else 0)
    return num_layers * heads * per_head


def sequence_layer(name, d_model: int, head_dim: int, backend: str, conv_size: int,
                   layer_name: Optional[str] = None) -> nn.Module:
    """The mixer for model ``name`` of `MODELS` (heads of width ``head_dim``), or for a `dm.DesignModel`
    (heads of width its key dimension where its prior fixes one, else ``head_dim``)."""
    if isinstance(name, dm.DesignModel):
        key_dim = name.key_dim or heads_for(d_model, head_dim)[1]
        if d_model % key_dim:
            raise ValueError(f"d_model={d_model}: must be a multiple of the key dimension K={key_dim} that the "
                             f"design model {name.name or '(user-declared)'} fixes (heads of width K).")
        return layers.DesignLayer(name, d_model, num_heads=d_model // key_dim, key_dim=key_dim, backend=backend,
                                  dtype=F32, name=layer_name, conv_size=conv_size)
    check_models([name])
    kind, overrides = MODELS[name]
    heads, key_dim = heads_for(d_model, head_dim)
    options = {"conv_size": conv_size, **overrides}
    if kind == "attention":
        return CausalAttention(d_model, num_heads=heads, head_dim=key_dim, name=layer_name, **options)
    # `layers.named_layer`, with a module name: design-model options go to the model, the rest to the layer
    model_options = {k: options.pop(k) for k in list(options) if k in _MODEL_OPTIONS}
    return layers.DesignLayer(dm.NAMED_MODELS[kind](**model_options), d_model, num_heads=heads, key_dim=key_dim,
                              backend=backend, dtype=F32, name=layer_name, **options)


class Mlp(nn.Module):
    d_model: int
    ratio: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.ratio * self.d_model, dtype=F32, param_dtype=F32, name="up")(x)
        return nn.Dense(self.d_model, dtype=F32, param_dtype=F32, name="down")(jax.nn.gelu(h))


class Block(nn.Module):
    model: Any          # a name of `MODELS` or a `dm.DesignModel`
    d_model: int
    head_dim: int
    backend: str
    conv_size: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.LayerNorm(dtype=F32, param_dtype=F32, name=name)
        x = x + sequence_layer(self.model, self.d_model, self.head_dim, self.backend, self.conv_size,
                               layer_name="mixer")(norm("mixer_norm")(x))
        if self.mlp_ratio:
            x = x + Mlp(self.d_model, self.mlp_ratio, name="mlp")(norm("mlp_norm")(x))
        return x


class LanguageModel(nn.Module):
    """``(tokens [B,T], vectors [B,T,F] or None, positions [B,M] or None) -> logits [B,T,vocab_size]``,
    or ``[B,M,vocab_size]`` at ``positions`` only (float32).

    ``model``: a name of `MODELS` or a `dm.DesignModel` instance, or a tuple of them, one per layer (a
    hybrid: ``("gated_deltanet_no_conv", "bayesian_no_conv")``). ``positions`` picks the positions whose
    logits are wanted (the supervised ones, in training): the head is per position, so those logits are
    the same as the full ones there, for M/T of the head's cost (MQAR supervises 1/16 of the positions)."""

    model: Any
    vocab_size: int
    d_model: int
    num_layers: int = 2
    head_dim: int = 64
    backend: str = "auto"
    conv_size: int = 4
    mlp_ratio: int = 0

    @nn.compact
    def __call__(self, tokens, vectors=None, positions=None):
        embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(0.02),
                         dtype=F32, param_dtype=F32, name="embed")
        x = embed(tokens)
        if vectors is not None:
            x = x + nn.Dense(self.d_model, use_bias=False, dtype=F32, param_dtype=F32,
                             name="vector_proj")(vectors.astype(F32))
        per_layer = self.model if isinstance(self.model, tuple) else (self.model,) * self.num_layers
        if len(per_layer) != self.num_layers:
            raise ValueError(f"LanguageModel.model: got {len(per_layer)} per-layer models {per_layer} for "
                             f"num_layers={self.num_layers}; accepted: one model, or a tuple of {self.num_layers}.")
        for i, layer_model in enumerate(per_layer):
            x = Block(layer_model, self.d_model, self.head_dim, self.backend, self.conv_size, self.mlp_ratio,
                      name=f"block_{i}")(x)
        if positions is not None:
            x = jnp.take_along_axis(x, positions[..., None], axis=1)
        x = nn.LayerNorm(dtype=F32, param_dtype=F32, name="final_norm")(x)
        return embed.attend(x)
