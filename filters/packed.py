"""Packed variable-length batches (``cu_seqlens``): one row of ``N`` sequences laid end to end, the state
reset at every boundary, for every lowering.

A packed row is ``[1, T, H, ...]`` holding sequence ``n`` at steps ``cu[n] <= t < cu[n + 1]`` (``cu =
cu_seqlens``, ``[N + 1]`` integers: ``cu[0] = 0``, non-decreasing, ``cu[N] = T``; the convention of
flash-linear-attention and FlashAttention). Filtering it must equal filtering each sequence alone from
its own initial state (the prior, or ``initial_state[n]``), and the final state is one per sequence,
``S [N, H, K, V]``.

How: the row is gathered into a right-padded batch ``[N, T_max, H, ...]`` (`unpack`), any lowering runs
that batch, and the readouts are gathered back into the row (`repack`). One piece of code for every
lowering, exact by construction:

* a padding step is **neutral**: ``q = k = v = 0``, the identity transition (``log a = 0``, or ``A = I``),
  no process noise, no write (``eta = 0``, ``s = 0``; the exact family's gain ``P k / (k^T P k + 1/beta)``
  is 0 for ``k = 0``, with ``beta = 1``), so ``S`` and ``P`` pass through it unchanged and the final
  state of a padded sequence is its state after its last real step;
* padding comes after the real steps and every lowering is causal, so it changes no readout; the
  chunked forms cut a padded sequence at the same steps as the sequence alone.

Cost: the lowering runs ``N T_max`` steps instead of ``T`` (the padding), plus two gathers of the
inputs and one of the readouts. For ``N`` sequences of similar lengths that is close to ``T``; for one
long sequence among short ones it approaches ``N T``. ``T_max`` is a static shape: computed from
``cu_seqlens`` when it is concrete (an eager call), else the ``max_seqlen`` argument (as FlashAttention
takes it), required then. A different ``T_max`` compiles the filter again; under ``jit`` a fixed
``max_seqlen`` (``T`` itself is always enough) compiles once.

Resetting by a zero decay at the boundaries instead would be cheaper but is exact only for the
additive and reset families started from ``S_0 = 0``, and for models that have a decay: not for the
exact family (whose ``P`` resets to the prior), nor for a given initial state per sequence.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from filters.checks import FilterInputError, check_values, is_concrete
from filters.inputs import StepInputs
from filters.structure import Structure


class PackedLayout(NamedTuple):
    """Where each step of a packed row goes: ``gather [N, T_max]`` (the row step read by padded step
    ``(n, t)``, clipped into the row), ``valid [N, T_max]`` (``t < T_n``), and for each row step its
    ``sequence [T]`` and ``position [T]`` (steps since its sequence started)."""

    gather: jax.Array
    valid: jax.Array
    sequence: jax.Array
    position: jax.Array


_ACCEPTED = ("integers [N + 1], the cumulative sequence starts of a packed row (as fla and "
             "FlashAttention take them): cu_seqlens[0] = 0, non-decreasing, cu_seqlens[N] = T")


def _zero(x):
    return x == 0


def _non_negative(x):
    return x >= 0


def check_cu_seqlens(cu_seqlens, *, batch: int, total: int, max_seqlen: Optional[int] = None,
                     validate: bool = True, name: str = "q") -> tuple[jax.Array, int]:
    """``cu_seqlens`` against a packed row of ``batch`` (must be 1) by ``total`` steps; returns it as
    int32 and ``T_max``, the padded length (see the module docstring).

    Shapes, dtype, the batch and ``max_seqlen`` are checked always; the values (``cu[0] = 0``,
    non-decreasing, ``cu[N] = T``, no sequence longer than ``max_seqlen``) unless ``validate=False``:
    at once when concrete, when the computation runs under ``jit`` (`filters.checks`). ``name``: the
    input whose shape gives ``batch`` and ``total``, for the messages."""
    if not hasattr(cu_seqlens, "shape") or not hasattr(cu_seqlens, "dtype"):
        if isinstance(cu_seqlens, (list, tuple)):
            cu_seqlens = np.asarray(cu_seqlens)
        else:
            raise FilterInputError(f"cu_seqlens: got {type(cu_seqlens).__name__}; accepted: {_ACCEPTED}.")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise FilterInputError(f"cu_seqlens: got shape {tuple(cu_seqlens.shape)}; accepted: {_ACCEPTED} "
                               "(at least one sequence: shape [N + 1] with N >= 1).")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise FilterInputError(f"cu_seqlens: got dtype {cu_seqlens.dtype}; accepted: {_ACCEPTED}; cast it with "
                               ".astype(jnp.int32).")
    if batch != 1:
        raise FilterInputError(
            f"{name}: got batch B = {batch} with cu_seqlens; a packed batch is one row [1, T, H, ...] holding "
            f"the sequences end to end; accepted: B = 1 (reshape it to [1, B * T, ...] with cu_seqlens = "
            f"arange(B + 1) * T, or drop cu_seqlens).")
    if max_seqlen is not None and (not isinstance(max_seqlen, (int, np.integer)) or isinstance(max_seqlen, bool)
                                   or max_seqlen < 1):
        raise FilterInputError(f"max_seqlen={max_seqlen!r}: accepted: a Python int >= 1, at least the longest "
                               f"sequence (the padded length, a static shape; T = {total} is always enough).")
    cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
    if max_seqlen is None:
        if not is_concrete(cu_seqlens):
            raise FilterInputError(
                "max_seqlen: needed when cu_seqlens is traced (under jit, grad, vmap): the sequences are padded "
                f"to max_seqlen steps, a static shape; accepted: max_seqlen=<an int >= the longest sequence> "
                f"(T = {total} is always enough), or a concrete cu_seqlens.")
        lengths = np.diff(np.asarray(cu_seqlens))
        max_seqlen = max(int(lengths.max()), 1)
    max_seqlen = min(int(max_seqlen), max(total, 1))   # no sequence is longer than the row
    if validate:
        lengths = cu[1:] - cu[:-1]
        check_values("cu_seqlens[0]", cu[:1], _zero, f"0 (sequences start at step 0); {_ACCEPTED}")
        check_values("cu_seqlens", lengths, _non_negative, f"{_ACCEPTED}",
                     shown={"cu_seqlens[n + 1] - cu_seqlens[n]": lengths})
        check_values("cu_seqlens[-1]", cu[-1:] - total, _zero,
                     f"T = {total}, the length of the packed row {name}; {_ACCEPTED}",
                     shown={"cu_seqlens[-1]": cu[-1:]})
        check_values("max_seqlen", max_seqlen - lengths, _non_negative,
                     f"every sequence at most max_seqlen = {max_seqlen} steps (pass a larger max_seqlen)",
                     shown={"sequence length cu_seqlens[n + 1] - cu_seqlens[n]": lengths})
    return cu, max_seqlen


def positions(cu: jax.Array, total: int) -> tuple[jax.Array, jax.Array]:
    """For each step ``t < total`` of the row: its sequence ``n`` (``cu[n] <= t < cu[n + 1]``) and its
    position ``t - cu[n]``. The sequence index counts the boundaries at or before ``t``: a parallel
    cumulative sum, empty sequences included (they add two boundaries at one step)."""
    marks = jnp.zeros((total,), jnp.int32).at[cu[1:-1]].add(1, mode="drop")
    sequence = jnp.clip(jnp.cumsum(marks), 0, cu.shape[0] - 2)
    return sequence, jnp.arange(total, dtype=jnp.int32) - cu[sequence]


def layout(cu: jax.Array, total: int, max_seqlen: int) -> PackedLayout:
    """The `PackedLayout` of a checked ``cu`` (`check_cu_seqlens`)."""
    steps = jnp.arange(max_seqlen, dtype=jnp.int32)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    gather = jnp.clip(starts[:, None] + steps, 0, max(total - 1, 0))
    sequence, position = positions(cu, total)
    return PackedLayout(gather, steps < lengths[:, None], sequence, position)


def _neutral(structure: Structure, field: str, x):
    """The value of ``field`` at a padding step (module docstring): no write, no decay, no noise."""
    if field == "transition" and structure.transition == "dense":
        return jnp.eye(x.shape[-1], dtype=x.dtype)
    return jnp.ones((), x.dtype) if field in ("precision", "reset_variance") else jnp.zeros((), x.dtype)


def unpack(structure: Structure, x: StepInputs, plan: PackedLayout) -> StepInputs:
    """The packed row ``x [1, T, H, ...]`` as a right-padded batch ``[N, T_max, H, ...]`` of neutral
    padding steps."""
    def one(field, a):
        if a is None:
            return None
        neutral = _neutral(structure, field, a)
        if a.shape[1] == 0:                                          # an empty row: every sequence is empty
            return jnp.broadcast_to(neutral, plan.valid.shape + a.shape[2:])
        rows = a[0][plan.gather]                                     # [N, T_max, H, ...]
        mask = plan.valid.reshape(plan.valid.shape + (1,) * (rows.ndim - 2))
        return jnp.where(mask, rows, neutral)
    return StepInputs(*(one(field, a) for field, a in zip(StepInputs._fields, x)))


def repack(y, plan: PackedLayout):
    """A padded batch ``[N, T_max, ...]`` (or None) back into the packed row ``[1, T, ...]``."""
    return None if y is None else y[plan.sequence, plan.position][None]
