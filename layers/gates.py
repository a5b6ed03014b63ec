"""Gate heads: the run-time inputs a design model declares, produced from the layer input ``x``.

The parameterizations are `layers.core.gates` (its docstring lists each and its range); this linen module
creates their parameters (`layers.core.gate_parameter_tree`) and calls it.
"""
from __future__ import annotations

import flax.linen as nn

import designmodels as dm
from layers import core
from layers.design_layer import make_parameters


class Gates(nn.Module):
    """``x [B, T, D] -> {name: gate [B, T, H, ...]}`` for the model's declared run-time inputs."""

    model: dm.DesignModel
    num_heads: int
    key_dim: int
    beta_min: float = 1e-2
    beta_max: float = 16.0
    gate_logit_normalizer: float = 16.0

    @nn.compact
    def __call__(self, x):
        params = make_parameters(self, core.gate_parameter_tree(self.model, self.num_heads, self.key_dim,
                                                                x.shape[-1]))
        return core.gates(self.model, params, x, num_heads=self.num_heads, key_dim=self.key_dim,
                          beta_min=self.beta_min, beta_max=self.beta_max,
                          gate_logit_normalizer=self.gate_logit_normalizer)
