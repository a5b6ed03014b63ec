"""`layers.nnx.DesignLayer`: the design layer as a native Flax NNX module, and the named NNX layers.

The same layer as the linen `layers.DesignLayer`: both create the parameters that
`layers.core.parameter_tree` lists, under the same names and with the same initializers, and call
`layers.core.forward` and `layers.core.step`, so a parameter tree of one runs in the other unchanged::

    layer = layers.nnx.GatedDeltaNet(64, num_heads=4, key_dim=16, rngs=nnx.Rngs(0))
    y = layer(x)                                   # x [B, T, D] -> y [B, T, D]
    y, cache = layer(x, return_cache=True)         # after a prompt
    y_t, cache = layer.step(x_t, cache)            # x_t [B, D]: one decoding step
    variables = layer.linen_variables()            # {"params": ...} for the linen layer's apply
    layer = layers.nnx.DesignLayer.from_linen(linen_layer, variables)

The parameters are `nnx.Param` attributes grouped as in the linen tree (``layer.params.q_proj.kernel``,
``layer.params.gates.beta_proj.bias``, ...): ``nnx.state(layer, nnx.Param)`` has the structure of the linen
layer's variables (``{"params": ...}``), and `nnx.Optimizer`, `nnx.jit` and `nnx.grad` apply as to any NNX
module.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

import designmodels as dm
from layers import core
from layers.core import LayerError
from layers.named import LAYER_OPTIONS, split_options


# flax 0.12 deprecates ``Variable.value`` for ``get_value`` / ``set_value``, which earlier releases lack
def _get(variable: nnx.Variable):
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable: nnx.Variable, value) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:  # pragma: no cover (flax < 0.12)
        variable.value = value


class ParameterGroup(nnx.Module):
    """A group of parameters named as in the linen layer: an `nnx.Param` per leaf of a tree of
    `layers.core.ParamSpec`, a nested group per sub-tree."""

    def __init__(self, tree: Mapping, rngs: nnx.Rngs):
        for name, item in tree.items():
            setattr(self, name, ParameterGroup(item, rngs) if isinstance(item, Mapping)
                    else nnx.Param(item.create(rngs.params())))

    def _members(self):
        return [(name, value) for name, value in vars(self).items()
                if isinstance(value, (ParameterGroup, nnx.Param))]

    def values(self) -> dict:
        """The parameter values as nested dicts (the form `layers.core` takes)."""
        return {name: value.values() if isinstance(value, ParameterGroup) else _get(value)
                for name, value in self._members()}

    def load(self, tree: Mapping, path: str = "params") -> None:
        """Set every parameter from nested dicts of arrays of the same names and shapes."""
        mine = dict(self._members())
        if not isinstance(tree, Mapping) or set(tree) != set(mine):
            got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise LayerError(f"{path}: got {got}; expected the parameters {sorted(mine)} (a layer with other "
                             "attributes, or another layer's parameters?).")
        for name, value in mine.items():
            if isinstance(value, ParameterGroup):
                value.load(tree[name], f"{path}/{name}")
                continue
            new = jnp.asarray(tree[name])
            if new.shape != _get(value).shape:
                raise LayerError(f"{path}/{name}: got shape {new.shape}; expected {_get(value).shape}.")
            _set(value, new.astype(_get(value).dtype))


class DesignLayer(nnx.Module):
    """A sequence layer derived from a design model (Flax NNX); attributes as in `layers.DesignLayer`.

    Args:
      model: the design model (any `designmodels.DesignModel`).
      d_model: input and output width ``D``.
      num_heads, key_dim, value_dim, backend, conv_size, normalize_qk, output_gate, output_norm, dtype, chunk_size:
        as the linen `layers.DesignLayer` (see `layers.core.LayerSpec`).
      rngs: an `nnx.Rngs` with a ``params`` stream (or a default one) for the initialization.
    """

    def __init__(self, model: dm.DesignModel, d_model: int, *, num_heads: int = 4, key_dim: int = 32,
                 value_dim: Optional[int] = None, backend: str = "auto", conv_size: int = 4,
                 normalize_qk: Optional[bool] = None, output_gate: bool = True, output_norm: bool = True,
                 dtype: Any = jnp.float32, chunk_size: Optional[int] = None, rngs: nnx.Rngs):
        self.spec = core.LayerSpec(model, d_model, num_heads, key_dim, value_dim, backend, conv_size,
                                   normalize_qk, output_gate, output_norm, dtype, chunk_size)
        self.params = ParameterGroup(core.parameter_tree(self.spec), rngs)

    def __call__(self, x, cache=None, *, return_cache: bool = False, cu_seqlens=None, max_seqlen=None):
        """``x [B, T, D] -> y [B, T, D]``; with ``return_cache`` also the cache for decoding onwards;
        ``cu_seqlens``: ``x [1, T, D]`` packs sequences end to end (`layers.core.forward`)."""
        return core.forward(self.spec, self.params.values(), x, cache, return_cache=return_cache,
                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def step(self, x, cache=None):
        """One decoding step: ``x [B, D] -> (y [B, D], cache)``."""
        return core.step(self.spec, self.params.values(), x, cache)

    def readout_weights(self, x):
        """``W [B, H, T, T]``, the filter's readout as weights on its values (`layers.core.readout_weights`)."""
        return core.readout_weights(self.spec, self.params.values(), x)

    # ------------------------------------------------------------------------------------------------
    # the linen layer
    # ------------------------------------------------------------------------------------------------

    def linen_variables(self) -> dict:
        """``{"params": ...}``: this layer's parameters as the linen `layers.DesignLayer` with the same
        attributes takes them (``linen_layer.apply(layer.linen_variables(), x)``)."""
        return {"params": self.params.values()}

    def load_linen_variables(self, variables: Mapping) -> "DesignLayer":
        """Set the parameters from a linen layer's variables (``{"params": ...}`` or the params alone);
        returns this layer."""
        params = variables["params"] if isinstance(variables, Mapping) and set(variables) == {"params"} else variables
        self.params.load(params)
        return self

    def to_linen(self):
        """The linen `layers.DesignLayer` with the same attributes (its parameters: `linen_variables`)."""
        from layers.design_layer import DesignLayer as LinenDesignLayer
        return LinenDesignLayer(**self.spec.attributes())

    @classmethod
    def from_linen(cls, linen_layer, variables: Mapping) -> "DesignLayer":
        """The NNX layer with the attributes of ``linen_layer`` (a `layers.DesignLayer`) and the
        parameters ``variables`` (what its ``init`` returned)."""
        # shapes only: the values come from ``variables``, so no random initialization is run
        layer = nnx.eval_shape(lambda: cls(**linen_layer.spec.attributes(), rngs=nnx.Rngs(0)))
        return layer.load_linen_variables(variables)


def named_layer(name: str, d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:
    """``named_layer("gated_deltanet", 256, num_heads=4, rngs=nnx.Rngs(0))``: the NNX layer of a named
    model; model options (``gamma``, ``prior_variance``, ``process_noise``, ``noise``, ``decay``) go to the
    model, as in `layers.named_layer`."""
    model, layer_kwargs = split_options(name, kwargs, LAYER_OPTIONS)
    return DesignLayer(model, d_model, rngs=rngs, **layer_kwargs)


def LinearAttention(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("linear_attention", d_model, rngs=rngs, **kwargs)


def RetNet(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("retnet", d_model, rngs=rngs, **kwargs)


def GLA(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("gla", d_model, rngs=rngs, **kwargs)


def Mamba2(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("mamba2", d_model, rngs=rngs, **kwargs)


def DeltaNet(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("deltanet", d_model, rngs=rngs, **kwargs)


def GatedDeltaNet(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("gated_deltanet", d_model, rngs=rngs, **kwargs)


def Longhorn(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("longhorn", d_model, rngs=rngs, **kwargs)


def BayesianLayer(d_model: int, *, rngs: nnx.Rngs, **kwargs) -> DesignLayer:  # noqa: N802
    return named_layer("bayesian", d_model, rngs=rngs, **kwargs)
