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

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

import designmodels as dm
import filters
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
    # The Bayesian Layer with fixed process noise along the key, Q_t = 5 k_t k_t^T: a write replaces what the
    # memory held at its key (gain >= 5 / (5 + 1 / beta)); as a convolution-free first layer it learned base
    # MQAR where the stationary one did not (docs/results/mqar/no_conv.md). The chunked lowering and its Pallas kernels run it.
    "bayesian_key": ("bayesian", {"noise": "key", "process_noise": 5.0}),
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


def _design_model(kind: str, overrides: dict[str, Any]) -> dm.DesignModel:
    """The design model of a `MODELS` entry (its design-model options; the rest are the layer's)."""
    return dm.NAMED_MODELS[kind](**{k: v for k, v in overrides.items() if k in _MODEL_OPTIONS})


def lowering_of(name: str, backend: str, platform: Optional[str] = None) -> str:
    """The backend that model ``name``'s design layers run when asked for ``backend``, as a run records it:
    ``"auto"`` resolved for its design model on ``platform`` (default: jax's; `filters.lowering.auto`:
    ``"pallas"`` on a GPU, ``"chunked"`` on a CPU, for every model of `MODELS`), so that a record says which
    lowering trained it and a run folder made on one lowering is not resumed on another; any other backend as
    asked; and ``backend`` as asked for attention, which has no filter."""
    check_models([name])
    kind, overrides = MODELS[name]
    if kind == "attention" or backend != "auto":
        return backend
    return filters.lowering.auto(filters.analyze(_design_model(kind, overrides)), platform=platform).name


def check_models(names) -> None:
    bad = [n for n in names if n not in MODELS]
    if bad:
        hints = "".join(dm.did_you_mean(b, MODELS) for b in bad)
        raise ValueError(f"config.models: {bad} not known{hints}; accepted: {', '.join(MODELS)}.")


def heads_for(d_model: int, head_dim: int) -> tuple[int, int]:
    """``(num_heads, key_dim)``: heads of width ``head_dim`` (one head when ``d_model <= head_dim``)."""
    heads = max(1, d_model // head_dim)
    return heads, d_model // heads


def rope(x: jax.Array, base: float = 10000.0, positions: Optional[jax.Array] = None) -> jax.Array:
    """Rotary position embedding over the last axis of ``x [B, T, H, D]`` (D even; rotate-half form), at
    ``positions [B, T]`` (default ``0 .. T - 1`` in every row; a packed row restarts them at each sequence)."""
    time, dim = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, dim // 2, dtype=F32) * 2 / dim)
    if positions is None:
        positions = jnp.arange(time)[None]
    angle = positions.astype(F32)[..., None] * freqs                           # [B or 1, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
    x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Packing(NamedTuple):
    """A batch of packed rows (`experiments.tasks.pack`), as the sequence layers take it: for each step of
    each row ``[B, T]`` its ``sequence`` (index in its row) and ``position`` (steps since its sequence
    began); ``cu_seqlens [B S + 1]`` and ``max_seqlen`` (``T``) of the rows laid end to end as the one row
    ``[1, B T]`` that `layers.DesignLayer` takes (each row's start is a boundary, so nothing reaches from
    one row into the next)."""

    sequence: jax.Array
    position: jax.Array
    cu_seqlens: jax.Array
    max_seqlen: int


def packing(cu_seqlens: jax.Array, time: int) -> Packing:
    """The `Packing` of rows of ``time`` steps with ``cu_seqlens [B, S + 1]`` (each row's, `tasks.pack`)."""
    if cu_seqlens.ndim != 2 or cu_seqlens.shape[1] < 2:
        raise ValueError(f"cu_seqlens: got shape {tuple(cu_seqlens.shape)}; accepted: [B, S + 1], each packed "
                         "row's cumulative sequence starts (experiments.tasks.pack).")
    cu = cu_seqlens.astype(jnp.int32)
    sequence, position = jax.vmap(lambda c: filters.packed.positions(c, time))(cu)
    rows = cu.shape[0]
    starts = (cu[:, :-1] + time * jnp.arange(rows, dtype=jnp.int32)[:, None]).reshape(-1)
    flat = jnp.concatenate([starts, jnp.full((1,), rows * time, jnp.int32)])
    return Packing(sequence, position, flat, time)


class CausalAttention(nn.Module):
    """Causal multi-head softmax attention (the baseline): q, k, v projections, the same short causal
    convolution as the design layers (``conv_size``, 0 disables), rotary positions, output projection.

    With a `Packing` (rows of sequences laid end to end), step ``t`` attends to step ``s`` only when
    ``s <= t`` and both are in the same sequence (a block-diagonal causal mask), the rotary positions and
    the convolution restart at each sequence: each sequence's outputs are those it has alone."""

    d_model: int
    num_heads: int = 1
    head_dim: int = 64
    conv_size: int = 4
    use_rope: bool = True

    @nn.compact
    def __call__(self, x, packed: Optional[Packing] = None):
        batch, time, _ = x.shape
        width = self.num_heads * self.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=F32, param_dtype=F32, name=name)
        q, k, v = dense(width, "q_proj")(x), dense(width, "k_proj")(x), dense(width, "v_proj")(x)
        if self.conv_size:
            def conv(name, z):     # packed: the rows as one [1, B T] row whose positions restart per sequence
                if packed is None:
                    return layers.ShortConv(self.conv_size, name=name)(z)[0]
                flat = z.reshape(1, batch * time, z.shape[-1])
                y = layers.ShortConv(self.conv_size, name=name)(flat, positions=packed.position.reshape(-1))[0]
                return y.reshape(z.shape)
            q, k, v = (conv(f"{n}_conv", z) for n, z in zip("qkv", (q, k, v)))
        split = lambda z: z.reshape(batch, time, self.num_heads, self.head_dim).astype(F32)
        q, k, v = split(q), split(k), split(v)
        if self.use_rope:
            positions = None if packed is None else packed.position
            q, k = rope(q, positions=positions), rope(k, positions=positions)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) * self.head_dim ** -0.5
        mask = jnp.tril(jnp.ones((time, time), bool))
        if packed is not None:      # [B, 1, T, T]: causal and within one sequence
            mask = mask & (packed.sequence[:, :, None] == packed.sequence[:, None, :])[:, None]
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
    model = _design_model(kind, overrides)
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
    def __call__(self, x, packed: Optional[Packing] = None):
        norm = lambda name: nn.LayerNorm(dtype=F32, param_dtype=F32, name=name)
        mixer = sequence_layer(self.model, self.d_model, self.head_dim, self.backend, self.conv_size,
                               layer_name="mixer")
        h = norm("mixer_norm")(x)
        if packed is None:
            h = mixer(h)
        elif isinstance(mixer, CausalAttention):
            h = mixer(h, packed)
        else:            # a design layer: its filter takes one row [1, B T, D] and the boundaries in it
            flat = h.reshape(1, -1, h.shape[-1])
            h = mixer(flat, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen).reshape(h.shape)
        x = x + h
        if self.mlp_ratio:
            x = x + Mlp(self.d_model, self.mlp_ratio, name="mlp")(norm("mlp_norm")(x))
        return x


class LanguageModel(nn.Module):
    """``(tokens [B,T], vectors [B,T,F] or None, positions [B,M] or None, cu_seqlens [B,S+1] or None) ->
    logits [B,T,vocab_size]``, or ``[B,M,vocab_size]`` at ``positions`` only (float32).

    ``cu_seqlens``: each row packs sequences end to end (`experiments.tasks.pack`: sequence ``j`` of row
    ``b`` at ``cu_seqlens[b, j] <= t < cu_seqlens[b, j + 1]``); every sequence layer resets at each
    boundary (`Packing`; the embedding, MLPs and head are per position), so each sequence's logits are
    those it has alone in a padded row.

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
    def __call__(self, tokens, vectors=None, positions=None, cu_seqlens=None):
        packed = None if cu_seqlens is None else packing(jnp.asarray(cu_seqlens), tokens.shape[1])
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
                      name=f"block_{i}")(x, packed)
        if positions is not None:
            x = jnp.take_along_axis(x, positions[..., None], axis=1)
        x = nn.LayerNorm(dtype=F32, param_dtype=F32, name="final_norm")(x)
        return embed.attend(x)
