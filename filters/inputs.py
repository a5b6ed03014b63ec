"""Run-time inputs as every lowering sees them, and the parameterization that makes them: pure math from
checked gates to `StepInputs` (the checks themselves are at the boundary, `filters.checks`).

Shape legend (the layout of the PyTorch peer ``flash-linear-attention``; the aliases are in `filters.shapes`)::

    q, k   [B, T, H, K]      queries and keys (Mamba-2: C and B)
    v      [B, T, H, V]      values (Mamba-2: x)
    gates  [B, T, H]         per step and head (``log_decay`` of a diagonal transition: [B, T, H, K])
    S      [B, H, K, V]      the memory mean (flash-linear-attention's layout); ``y_t = S_t^T q_t``
    P      [B, H, K, K]      the key-space covariance shared by every value column (exact family only)

The parameterization (`parameterize`), from the `Structure` and the gates (a fixed value is broadcast
over ``[B, T, H]``):

* ``transition``: None (identity), ``log a_t`` (scalar ``[B,T,H]`` or diagonal ``[B,T,H,K]`` kind) or
  the matrix ``A_t`` (dense kind);
* ``process_noise``: ``q_t`` of random-walk noise ``Q_t = q_t I``;
* additive family: ``input_scale`` ``s_t`` (None: ``s_t = 1``);
* exact family: ``precision`` ``beta_t``;
* reset family with a run-time write strength: ``eta_t = beta_t``, ``sigma_t^2 = eta_t / (1 - eta_t |k_t|^2)``;
* reset family with a fixed ``sigma^2``: ``eta_t = sigma^2 beta_t / (1 + sigma^2 beta_t |k_t|^2)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from filters import shapes
from filters.structure import Structure


class FilterState(NamedTuple):
    """The state of a filter: ``mean`` ``S [B,H,K,V]`` and, for the exact family, ``covariance``
    ``P [B,H,K,K]`` (None for the additive and reset families, whose covariance drops out).

    ``S`` is in flash-linear-attention's layout, keys by values (``y_t = S_t^T q_t``), and there is no
    other: a state from fla (``[B, H, K, V]``) is passed as it is. A state in the transposed layout
    ``[B, H, V, K]`` is refused with a message that says so when ``K != V``; when ``K == V`` the shapes
    cannot tell the two apart, so transpose such a state yourself (``swapaxes(-1, -2)``).
    """

    mean: shapes.Mean
    covariance: Optional[shapes.Covariance] = None


class StepInputs(NamedTuple):
    """Normalized per-step quantities, all ``[B, T, H, ...]`` (``[B, H, ...]`` for one decoding step).

    ``q, k, v`` keep the dtype they came in (bfloat16 stays bfloat16, so that a kernel can multiply
    them on tensor cores); every other field is in the compute dtype (float32, or float64 when an input
    is). A lowering casts what it needs: `in_compute_dtype` casts ``q, k, v`` as well.

    ``transition``: None (identity), log decays (scalar or diagonal kind) or matrices (dense kind).
    ``write_strength``: the reset family's ``eta_t`` (the delta-rule step), ``reset_variance`` its
    ``sigma_t^2``. ``precision``: the exact family's ``beta_t``. ``input_scale``: the additive ``s_t``.
    """

    q: shapes.SteppedKeys
    k: shapes.SteppedKeys
    v: shapes.SteppedValues
    transition: Optional[shapes.SteppedTransition] = None
    process_noise: Optional[shapes.SteppedPerHead] = None
    precision: Optional[shapes.SteppedPerHead] = None
    write_strength: Optional[shapes.SteppedPerHead] = None
    reset_variance: Optional[shapes.SteppedPerHead] = None
    input_scale: Optional[shapes.SteppedPerHead] = None

    @property
    def compute_dtype(self):
        """float32, or float64 when any of ``q, k, v`` is float64 (never a narrower float)."""
        return compute_dtype(self.q, self.k, self.v)

    def in_compute_dtype(self) -> "StepInputs":
        """These inputs with ``q, k, v`` cast to the compute dtype too."""
        dtype = self.compute_dtype
        return self._replace(q=self.q.astype(dtype), k=self.k.astype(dtype), v=self.v.astype(dtype))


def compute_dtype(*arrays):
    """float64 if any input is float64 (x64 on), else float32: accumulation never happens in bf16."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def key_norms(k, dtype):
    """``|k_t|^2`` ``[B, T, H]`` in ``dtype``."""
    return jnp.sum(jnp.square(k.astype(dtype)), axis=-1)


def parameterize(structure: Structure, q, k, v, gates: dict) -> StepInputs:
    """`StepInputs` from ``q, k, v`` and the run-time gates by name (checked: the model's inputs, of the
    right shapes), as the module docstring writes them. Pure math: no checks."""
    q, k, v = (jnp.asarray(x) for x in (q, k, v))                # in their own dtype (see StepInputs)
    dtype = compute_dtype(q, k, v)
    gates = {name: jnp.asarray(g).astype(dtype) for name, g in gates.items()}
    ones = jnp.ones(q.shape[:-1], dtype)
    fields = dict(q=q, k=k, v=v, transition=_transition(structure, gates, ones))
    if structure.noise in ("random_walk", "key"):                # q_t of q_t I or of q_t k_t k_t^T
        fixed = structure.fixed_process_noise
        fields["process_noise"] = gates["process_noise"] if fixed is None else fixed * ones
    if structure.family == "additive":
        return StepInputs(**fields, input_scale=gates.get("input_scale"))
    beta = gates["beta"] if structure.fixed_precision is None else structure.fixed_precision * ones
    if structure.family == "exact":
        return StepInputs(**fields, precision=beta)
    key_norm2 = key_norms(k, dtype)
    if structure.write_strength:                                 # the run-time beta is eta itself
        return StepInputs(**fields, write_strength=beta, reset_variance=beta / (1 - beta * key_norm2))
    sigma2 = structure.reset_variance
    return StepInputs(**fields, write_strength=sigma2 * beta / (1 + sigma2 * beta * key_norm2),
                      reset_variance=sigma2 * ones)


def _transition(structure: Structure, gates: dict, ones):
    """The transition in normalized form (see `filters.transitions`): a fixed one broadcast, else the gate."""
    kind, fixed = structure.transition, structure.fixed_transition
    if kind == "identity":
        return None
    if fixed is None:
        return gates.get("transition" if kind == "dense" else "log_decay")   # an optional decay may be absent
    fixed = jnp.asarray(fixed, ones.dtype)
    return ones.reshape(ones.shape + (1,) * fixed.ndim) * fixed


def prior_state(structure: Structure, *, batch: int, heads: int, key_dim: int, value_dim: int,
                dtype) -> FilterState:
    """The prior state: ``S_0 = 0`` and, for the exact family, ``P_0`` from the prior."""
    mean = jnp.zeros((batch, heads, key_dim, value_dim), dtype)
    if structure.family != "exact":
        return FilterState(mean, None)
    p0 = jnp.asarray(structure.prior_covariance(key_dim), dtype)
    return FilterState(mean, jnp.broadcast_to(p0, (batch, heads, key_dim, key_dim)))
