"""`DesignLayer`: one Flax linen layer for every design model.

::

    x [B,T,D] -> q, k, v projections -> (short causal conv + SiLU) -> (L2-normalized q, k)
              -> gates declared by the model (`layers.gates`)
              -> filter (any backend) -> per-head RMSNorm -> output gate SiLU(x W_g) -> out projection

Keys are L2-normalized for the reset and exact families: a write strength is then a reset exactly when
it is below one, and a precision bounds the write gain away from one. Decoding uses a cache
``{"filter": FilterState, "conv": (q, k, v) buffers}`` and equals the parallel form.

The mathematics lives in `layers.core` (pure functions of a parameter tree); this module only creates
the parameters as linen variables and calls it. `layers.nnx.DesignLayer` is the same layer in Flax NNX,
with the same parameter tree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

import designmodels as dm
from layers import core
from layers.core import LayerError  # noqa: F401  (re-exported: layers.LayerError)


class ParameterTree(nn.Module):
    """Creates the parameters of a tree of `layers.core.ParamSpec` (a sub-tree: a submodule of that name)
    and returns their values as nested dicts, the form `layers.core` takes."""

    tree: Mapping

    @nn.compact
    def __call__(self) -> dict:
        return make_parameters(self, self.tree)


def make_parameters(module: nn.Module, tree: Mapping) -> dict:
    """Inside a compact method of ``module``: its parameters (and sub-trees as `ParameterTree` submodules)."""
    return {name: ParameterTree(item, name=name)() if isinstance(item, Mapping)
            else module.param(name, item.init, item.shape, jnp.float32) for name, item in tree.items()}


class ShortConv(nn.Module):
    """Depthwise causal convolution over time then SiLU (`layers.core.short_conv`)."""

    size: int

    @nn.compact
    def __call__(self, x, history=None, positions=None):
        """``x [B, T, C]``, ``history [B, size - 1, C]`` (the previous inputs; zeros at the start),
        ``positions [T]`` (a packed row's steps since their sequence began: no term reaches back across a
        boundary). Returns ``(y, new_history)``."""
        kernel = self.param("kernel", core._CONV_KERNEL, (self.size, x.shape[-1]), jnp.float32)
        return core.short_conv(kernel, x, history, positions)


class DesignLayer(nn.Module):
    """A sequence layer derived from a design model (linen). Its attributes are `layers.core.LayerSpec`'s,
    documented and checked there (``model``, ``d_model``, ``num_heads``, ``key_dim``, ``value_dim``,
    ``backend``, ``conv_size``, ``normalize_qk``, ``output_gate``, ``output_norm``, ``dtype``,
    ``chunk_size``); a linen module declares them again as its own fields."""

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
        _ = self.spec                        # check the attributes now, with the message of each
        super().__post_init__()

    @property
    def spec(self) -> core.LayerSpec:
        """The attributes as a `layers.core.LayerSpec` (what `layers.core` and the NNX layer take)."""
        return core.LayerSpec(**{field.name: getattr(self, field.name) for field in dataclasses.fields(core.LayerSpec)})

    def setup(self):
        # one submodule per top-level group, named as the group: the tree is `layers.core.parameter_tree`
        for name, item in core.parameter_tree(self.spec).items():
            setattr(self, name, ParameterTree(item))

    def _params(self) -> dict:
        return {name: getattr(self, name)() for name in core.parameter_tree(self.spec)}

    def __call__(self, x, cache=None, *, return_cache: bool = False, cu_seqlens=None, max_seqlen=None):
        """``x [B, T, D] -> y [B, T, D]``; with ``return_cache`` also the cache for decoding onwards.

        ``cu_seqlens`` (``[N + 1]`` integers, as fla and FlashAttention take them): ``x [1, T, D]`` holds
        ``N`` sequences end to end; the short convolution and the filter restart at every boundary, so
        each sequence's outputs are those it has alone (`layers.core.forward`); ``max_seqlen`` (an int at
        least the longest sequence) is required under ``jit``."""
        return core.forward(self.spec, self._params(), x, cache, return_cache=return_cache,
                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def step(self, x, cache=None):
        """One decoding step: ``x [B, D] -> (y [B, D], cache)``."""
        return core.step(self.spec, self._params(), x, cache)

    def readout_weights(self, x):
        """``W [B, H, T, T]``, the filter's readout as weights on its values (`layers.core.readout_weights`)."""
        return core.readout_weights(self.spec, self._params(), x)
