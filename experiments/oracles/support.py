"""Random, valid run-time inputs for any design model, from its declared run-time interface."""
from __future__ import annotations

import numpy as np

import designmodels as dm


def random_inputs(model: dm.DesignModel, *, batch=2, time=7, heads=3, key_dim=4, value_dim=5, seed=0,
                  dtype=np.float64, unit_keys=True):
    """``(q, k, v, gates)`` with gates drawn inside the accepted ranges of ``model.runtime_inputs``."""
    rng = np.random.default_rng(seed)
    lead = (batch, time, heads)
    q = rng.normal(size=(*lead, key_dim))
    k = rng.normal(size=(*lead, key_dim))
    if unit_keys:
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(*lead, value_dim))
    gates = {}
    for spec in model.structure.inputs:
        shape = (*lead, *(key_dim for _ in spec.trailing))
        if spec.domain is dm.Domain.LOG_DECAY:
            gates[spec.name] = -rng.uniform(0.01, 0.7, size=shape)
        elif spec.domain is dm.Domain.TRANSITION:
            a = rng.normal(size=shape) / np.sqrt(key_dim)
            gates[spec.name] = 0.9 * a / np.linalg.norm(a, ord=2, axis=(-2, -1), keepdims=True)
        elif spec.domain is dm.Domain.PROCESS_NOISE:
            gates[spec.name] = rng.uniform(0.0, 0.3, size=shape)
        elif spec.domain is dm.Domain.INPUT_SCALE:
            gates[spec.name] = rng.uniform(0.05, 1.0, size=shape)
        elif spec.domain is dm.Domain.WRITE_STRENGTH:
            gates[spec.name] = rng.uniform(0.05, 0.95, size=shape) / np.sum(k * k, -1)
        elif spec.domain is dm.Domain.PRECISION:
            gates[spec.name] = rng.uniform(0.2, 5.0, size=shape)
        else:
            raise KeyError(spec.domain)
    cast = lambda x: np.asarray(x, dtype)
    return cast(q), cast(k), cast(v), {n: cast(g) for n, g in gates.items()}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
