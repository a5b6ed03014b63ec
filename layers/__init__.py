"""Layer: one Flax module for every design model, and the named layers as thin wrappers."""
from layers.design_layer import DesignLayer, LayerError, ShortConv, memory_span
from layers.gates import Gates
from layers.named import (
    GLA, BayesianLayer, DeltaNet, GatedDeltaNet, LinearAttention, Longhorn, Mamba2, RetNet, named_layer,
)
