"""Gate heads: the run-time inputs a design model declares, produced from the layer input ``x``.

Each declared input gets the parameterization of the architecture that made it known, chosen from its
`designmodels.Domain` (and its shape), so every output is valid by construction:

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
from designmodels import Domain


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
        specs = self.model.structure.inputs
        domain = {(spec.domain, spec.trailing): spec.name for spec in specs}
        scalar_decay, channel_decay = domain.get((Domain.LOG_DECAY, ())), domain.get((Domain.LOG_DECAY, ("K",)))
        heads, key_dim = self.num_heads, self.key_dim
        lead = x.shape[:-1]
        f32 = lambda z: z.astype(jnp.float32)
        dense = lambda n, name, **kw: f32(nn.Dense(n, name=name, dtype=x.dtype, **kw)(x))
        gates = {}
        if scalar_decay or (Domain.INPUT_SCALE, ()) in domain:
            dt = jax.nn.softplus(dense(heads, "dt_proj", use_bias=False)
                                 + self.param("dt_bias", _dt_bias_init(), (heads,)))
            if (Domain.INPUT_SCALE, ()) in domain:
                gates[domain[Domain.INPUT_SCALE, ()]] = dt
            if scalar_decay:
                a_log = self.param("A_log", lambda k, s: jnp.log(jax.random.uniform(k, s, jnp.float32, 1, 16)),
                                   (heads,))
                gates[scalar_decay] = -jnp.exp(a_log) * dt
        if channel_decay:
            logits = dense(heads * key_dim, "decay_proj").reshape(*lead, heads, key_dim)
            gates[channel_decay] = jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
        if (Domain.WRITE_STRENGTH, ()) in domain:
            gates[domain[Domain.WRITE_STRENGTH, ()]] = jax.nn.sigmoid(dense(heads, "beta_proj"))
        if (Domain.PRECISION, ()) in domain:
            logits = dense(heads, "beta_proj")
            gates[domain[Domain.PRECISION, ()]] = self.beta_min + (self.beta_max - self.beta_min) * jax.nn.sigmoid(logits)
        if (Domain.PROCESS_NOISE, ()) in domain:
            gates[domain[Domain.PROCESS_NOISE, ()]] = jax.nn.softplus(dense(heads, "noise_proj") - 4.0)
        if (Domain.TRANSITION, ("K", "K")) in domain:
            z = dense(heads * key_dim * key_dim, "transition_proj").reshape(*lead, heads, key_dim, key_dim)
            z = z + jnp.eye(key_dim)
            norm = jnp.sqrt(jnp.sum(z * z, axis=(-2, -1), keepdims=True))
            gates[domain[Domain.TRANSITION, ("K", "K")]] = z / jnp.maximum(1.0, norm)
        missing = [spec.name for spec in specs if spec.name not in gates]
        if missing:  # every domain above is handled; a new one must be given a parameterization
            raise NotImplementedError(f"Gates: no parameterization for run-time inputs {missing}.")
        return gates
