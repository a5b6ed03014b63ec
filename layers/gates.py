"""Gate heads: the run-time inputs a design model declares, produced from the layer input ``x``.

Each declared input gets the parameterization of the architecture that made it known, chosen from the
declared *structure*, so every output is valid by construction:

===================  =====================================================================  ==========
input                parameterization                                                       range
===================  =====================================================================  ==========
scalar log_decay     ``-exp(A_log) * softplus(x W + dt_bias)`` (Mamba-2, Gated DeltaNet)     ``(-inf, 0)``
input_scale          ``softplus(x W + dt_bias)``; Mamba-2's ``dt``, shared with the decay     ``> 0``
                     when both are declared (``log_decay = dt * A``)
diagonal log_decay   ``log_sigmoid(x W + b) / 16`` (GLA's low-temperature gate)              ``(-inf, 0)``
beta, write strength ``sigmoid(x W + b)`` (DeltaNet); keys are unit, so ``beta |k|^2 < 1``    ``(0, 1)``
beta, precision      ``beta_min + (beta_max - beta_min) sigmoid(x W + b)``: bounded, which     ``> 0``
                     keeps chunked factorizations well conditioned
process_noise        ``softplus(x W + b - 4)`` (starts small: about 0.018)                   ``>= 0``
dense transition     ``Z / max(1, ||Z||_F)``, ``Z = I + (x W + b)`` reshaped to ``K x K``     ``||A|| <= 1``
===================  =====================================================================  ==========
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import designmodels as dm


def _dt_bias_init(dt_min=1e-3, dt_max=0.1):
    """Mamba-2's init: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``."""
    def init(key, shape, dtype=jnp.float32):
        dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min))
                     + math.log(dt_min))
        return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    return init


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
        specs = self.model.runtime_inputs
        heads, key_dim = self.num_heads, self.key_dim
        lead = x.shape[:-1]
        f32 = lambda z: z.astype(jnp.float32)
        dense = lambda n, name, **kw: f32(nn.Dense(n, name=name, dtype=x.dtype, **kw)(x))
        gates = {}
        if "log_decay" in specs and specs["log_decay"].trailing == () or "input_scale" in specs:
            dt = jax.nn.softplus(dense(heads, "dt_proj", use_bias=False)
                                 + self.param("dt_bias", _dt_bias_init(), (heads,)))
            if "input_scale" in specs:
                gates["input_scale"] = dt
            if "log_decay" in specs and specs["log_decay"].trailing == ():
                a_log = self.param("A_log", lambda k, s: jnp.log(jax.random.uniform(k, s, jnp.float32, 1, 16)),
                                   (heads,))
                gates["log_decay"] = -jnp.exp(a_log) * dt
        if "log_decay" in specs and specs["log_decay"].trailing == ("K",):
            logits = dense(heads * key_dim, "decay_proj").reshape(*lead, heads, key_dim)
            gates["log_decay"] = jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
        if "beta" in specs:
            logits = dense(heads, "beta_proj")
            if "write strength" in specs["beta"].accepted:
                gates["beta"] = jax.nn.sigmoid(logits)
            else:
                gates["beta"] = self.beta_min + (self.beta_max - self.beta_min) * jax.nn.sigmoid(logits)
        if "process_noise" in specs:
            gates["process_noise"] = jax.nn.softplus(dense(heads, "noise_proj") - 4.0)
        if "transition" in specs:
            z = dense(heads * key_dim * key_dim, "transition_proj").reshape(*lead, heads, key_dim, key_dim)
            z = z + jnp.eye(key_dim)
            norm = jnp.sqrt(jnp.sum(z * z, axis=(-2, -1), keepdims=True))
            gates["transition"] = z / jnp.maximum(1.0, norm)
        missing = set(specs) - set(gates)
        if missing:  # every InputSpec name above is handled; a new one must be given a parameterization
            raise NotImplementedError(f"Gates: no parameterization for run-time inputs {sorted(missing)}.")
        return gates
