"""Layer: one Flax module for every design model (linen: `DesignLayer`; NNX: `layers.nnx.DesignLayer`),
both thin wrappers over `layers.core`, and the named layers."""
from layers import core
from layers.core import LayerError, memory_span
from layers.design_layer import DesignLayer, ShortConv
from layers.gates import Gates
from layers.named import (
    GLA, BayesianLayer, DeltaNet, GatedDeltaNet, LinearAttention, Longhorn, Mamba2, RetNet, named_layer,
)
from layers import nnx  # noqa: E402  (after the linen layer, which layers.nnx converts to)
