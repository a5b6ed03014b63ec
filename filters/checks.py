"""The boundary checks: every run-time input is checked once, where it enters the compiled filter
(`Filter.__call__`, `Filter.step`), and the lowerings trust what they are given.

* Shapes, ranks and dtypes, always: the message names the input, what it received and what is
  accepted (`FilterInputError`).
* Values (finite; in the `Domain` of each run-time input) and the readout (finite), unless
  ``validate=False``. One device path for every value check: a small jitted reduction counts the
  invalid entries and finds the first. Then one switch:

  - called eagerly, the count is concrete: the `FilterInputError` is raised at once;
  - under a transformation (``jit``, ``grad``, ``vmap``, ``scan``; also for concrete arrays closed over
    by a jitted function, which are traced there), the count is traced: a ``jax.debug.callback`` raises
    the `FilterInputError` when the computation runs. JAX delivers it wrapped in a
    ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``) whose message contains ours; inside
    ``with filters.reraise_input_errors():`` it is the `FilterInputError` itself. JAX logs a traceback
    for every failing callback; for ours it does not (a logging filter drops exactly those records).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from designmodels import did_you_mean
from designmodels.structure import Domain
from filters.inputs import FilterState, StepInputs, compute_dtype, key_norms, parameterize, prior_state
from filters.structure import Structure


class FilterInputError(ValueError):
    """A run-time input with a wrong shape, rank, dtype or value. The message says what is accepted."""


try:  # jax.core.Tracer is public in jax 0.10; keep working if a later release moves it
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


def is_concrete(x) -> bool:
    return x is not None and not isinstance(x, _Tracer)


def _shape_error(name, got, expected):
    raise FilterInputError(f"{name}: got shape {tuple(got)}; expected {expected}.")


# ----------------------------------------------------------------------------------------------------
# Value checks: one device path, one switch (module docstring).


def _finite(x):
    return jnp.isfinite(x)


def _non_positive(x):
    return jnp.isfinite(x) & (x <= 0)


def _non_negative(x):
    return jnp.isfinite(x) & (x >= 0)


def _positive(x):
    return jnp.isfinite(x) & (x > 0)


def _below_one(x):
    return jnp.isfinite(x) & (x >= 0) & (x < 1)


_PRECISION = "finite precisions beta > 0 (beta is the precision 1 / noise variance)"
# Domain -> (valid entries, what is accepted); the write strength is checked on beta_t |k_t|^2 (below).
_DOMAINS = {
    Domain.LOG_DECAY: (_non_positive, "finite log decays <= 0 (decays in (0, 1]; pass log a_t, e.g. "
                                      "-softplus(x), not a_t itself)"),
    Domain.TRANSITION: (_finite, "finite matrices"),
    Domain.PROCESS_NOISE: (_non_negative, "finite values >= 0"),
    Domain.INPUT_SCALE: (_finite, "finite values"),
    Domain.PRECISION: (_positive, _PRECISION),
}
_WRITE_STRENGTH = ("write strengths with 0 <= beta_t |k_t|^2 < 1 (a delta-rule step is a covariance reset "
                   "only then: sigma^2 = beta / (1 - beta |k|^2) > 0; with unit keys, beta in [0, 1), e.g. "
                   "beta = sigmoid(x)); larger steps are not representable as a design model")


@functools.partial(jax.jit, static_argnums=0)
def _first_invalid(ok, x, *shown):
    """The number of entries of ``x`` outside ``ok``, the flat index of the first, and the values of
    ``shown`` (arrays broadcastable to ``x``) there: three scalars, whatever the size of ``x``."""
    bad = ~ok(x)
    flat = jnp.argmax(bad.reshape(-1))
    return jnp.sum(bad), flat, tuple(jnp.broadcast_to(a, bad.shape).reshape(-1)[flat] for a in shown)


_raised_lock = threading.Lock()
_raised = collections.deque(maxlen=16)   # (serial, error): FilterInputErrors raised in computations
_serial = [0]


def _report_invalid(name: str, shape: tuple, accepted: str, labels: tuple, count, flat, *values) -> None:
    """Raise the `FilterInputError` for ``count`` invalid entries (none: return)."""
    count = int(count)
    if not count:
        return
    index = tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else ()
    shown = ", ".join(f"{label} = {float(value):.6g}" for label, value in zip(labels, values))
    raise FilterInputError(f"{name}: {count} invalid entries, first at index {index}: {shown}; "
                           f"accepted: {accepted}.")


def _report_from_computation(report, *args) -> None:
    """`_report_invalid` as a host callback: the error is remembered for `reraise_input_errors`."""
    try:
        report(*args)
    except FilterInputError as error:
        with _raised_lock:
            _serial[0] += 1
            _raised.append((_serial[0], error))
        raise


def check_values(name: str, x, ok, accepted: str, *, shown: Optional[dict] = None) -> None:
    """Raise if ``x`` has entries outside ``ok(x)`` (a boolean mask). The message gives the count, the
    first bad index and the value there (or the values of ``shown``, ``{label: array}``, at that index).
    Now if the count is concrete; when the computation runs if it is traced (module docstring)."""
    if x is None:
        return
    shown = shown or {name: x}
    x = jnp.asarray(x)
    if x.size == 0:           # nothing to check (a batch of 0 sequences): and argmax has no empty form
        return
    count, flat, values = _first_invalid(ok, x, *(jnp.asarray(a) for a in shown.values()))
    report = functools.partial(_report_invalid, name, tuple(x.shape), accepted, tuple(shown))
    if is_concrete(count):
        report(count, flat, *values)
    else:
        jax.debug.callback(functools.partial(_report_from_computation, report), count, flat, *values)


class _DropOwnCallbackErrors(logging.Filter):
    """JAX logs a traceback for every exception raised in a host callback; ours carry their own message
    and are raised to the caller, so that log record is noise (the stray traceback of issue #12)."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, FilterInputError)


for _logger in ("jax._src.debugging", "jax._src.callback"):   # where jax 0.10 logs failing callbacks
    logging.getLogger(_logger).addFilter(_DropOwnCallbackErrors())


@contextlib.contextmanager
def reraise_input_errors():
    """Inside, a `FilterInputError` raised by a check that ran inside a compiled computation (``jit`` and
    friends) reaches the caller as itself, not wrapped in ``jax.errors.JaxRuntimeError``::

        with filters.reraise_input_errors():
            y = jax.block_until_ready(jax.jit(g)(beta))    # a bad beta: FilterInputError

    Computations dispatch asynchronously: keep the point where the result is waited for inside.
    """
    with _raised_lock:
        start = _serial[0]
    try:
        yield
    except RuntimeError as wrapped:                            # jax.errors.JaxRuntimeError
        with _raised_lock:
            ours = [error for serial, error in _raised if serial > start and str(error) in str(wrapped)]
        if ours:
            raise ours[0] from wrapped
        raise


# ----------------------------------------------------------------------------------------------------
# Shapes and dtypes.


def check_qkv(q, k, v, *, key_dim: Optional[int], time_axis: bool = True, validate: bool = True):
    """Check the ranks and shapes of ``q, k, v`` and return ``(B, T, H, K, V)`` (T is None per step)."""
    rank = 4 if time_axis else 3
    layout = "[B, T, H, {}]" if time_axis else "[B, H, {}]"
    for name, x, last in (("q", q, "K"), ("k", k, "K"), ("v", v, "V")):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise FilterInputError(
                f"{name}: got {type(x).__name__}; expected an array (numpy or jax) of rank {rank} with layout "
                f"{layout.format(last)}; convert it with jnp.asarray.")
        if len(x.shape) != rank:
            step = "" if time_axis else " (a decoding step has no time axis; the whole sequence goes to f(...))"
            raise FilterInputError(
                f"{name}: got rank {len(x.shape)}, shape {tuple(x.shape)}; expected an array of rank {rank} with "
                f"layout {layout.format(last)}{step}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise FilterInputError(f"{name}: got dtype {x.dtype}; accepted: a floating dtype (float32, float64, "
                                   "bfloat16, float16); cast it with .astype(jnp.float32).")
    if k.shape != q.shape:
        _shape_error("k", k.shape, f"the shape of q {tuple(q.shape)} (keys and queries share {layout.format('K')})")
    if v.shape[:-1] != q.shape[:-1]:
        _shape_error("v", v.shape, f"{layout.format('V')} with {layout[1:-5]} = {tuple(q.shape[:-1])} as in q")
    if key_dim is not None and q.shape[-1] != key_dim:
        _shape_error("q", q.shape, f"key dimension K = {key_dim}, which the design model fixes")
    if validate:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_values(name, x, _finite, "finite values")
    if time_axis:
        batch, time, heads, kd = q.shape
    else:
        (batch, heads, kd), time = q.shape, None
    return batch, time, heads, kd, v.shape[-1]


def _as_gate(name: str, x):
    """A run-time gate as a floating jax array, or a clear error."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):
        raise FilterInputError(f"{name}: got {type(x).__name__} {x!r:.60}; accepted: a floating array.") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise FilterInputError(f"{name}: got dtype {x.dtype}; accepted: a floating dtype (float32, float64, "
                               "bfloat16, float16); cast it with .astype(jnp.float32).")
    return x


def check_gates(structure: Structure, q, gates: dict, *, time_axis: bool) -> dict:
    """The run-time gates against the declared ones (names, presence, shapes, dtypes); returns them as
    jax arrays, absent optional ones left out."""
    specs = structure.runtime_inputs
    model = structure.name or "user-declared"
    unknown = sorted(set(gates) - set(specs))
    if unknown:
        keywords = ("initial_state", "diagnostics", "validate") if time_axis else ("validate",)
        hints = "".join(did_you_mean(u, [*specs, *keywords]) for u in unknown)
        raise FilterInputError(
            f"{', '.join(unknown)}: not an input of this design model ({model}){hints}; accepted keyword "
            f"inputs: {', '.join(specs) or 'none besides q, k, v'} (and the options {', '.join(keywords)}).")
    lead = q.shape[:-1]
    key_dim = q.shape[-1]
    lead_text = "[B, T, H" if time_axis else "[B, H"
    checked = {}
    for name, spec in specs.items():
        x = gates.get(name)
        layout = f"{lead_text}{''.join(', ' + d for d in spec.trailing)}]"
        if x is None:
            if spec.required:
                raise FilterInputError(
                    f"{name}: missing; this design model ({model}) takes it at run time with shape {layout} "
                    f"({spec.accepted}); pass it by keyword, {name}=...")
            continue
        x = _as_gate(name, x)
        expected = (*lead, *(key_dim for _ in spec.trailing))
        if x.shape != expected:
            _shape_error(name, x.shape, f"{layout} = {expected} ({spec.accepted}); {lead_text[1:]} are read from "
                                        f"q of shape {tuple(q.shape)}, layout {lead_text}, K]")
        checked[name] = x
    return checked


def check_gate_values(structure: Structure, gates: dict, k) -> None:
    """Each run-time gate inside its `Domain` (in declaration order); a write strength on ``beta_t |k_t|^2``."""
    dtype = compute_dtype(k, *gates.values())
    for spec in structure.inputs:
        x = gates.get(spec.name)
        if x is None:
            continue
        if spec.domain is Domain.WRITE_STRENGTH:
            beta, key_norm2 = x.astype(dtype), key_norms(k, dtype)
            check_values(spec.name, beta * key_norm2, _below_one, _WRITE_STRENGTH,
                         shown={"beta_t |k_t|^2": beta * key_norm2, "beta_t": beta, "|k_t|^2": key_norm2})
        else:
            ok, accepted = _DOMAINS[spec.domain]
            check_values(spec.name, x, ok, accepted)


def prepare(structure: Structure, q, k, v, gates: dict, *, time_axis: bool = True,
            validate: bool = True) -> StepInputs:
    """The boundary: check ``q, k, v`` and the gates against the model's declared run-time inputs, then
    `parameterize` them. ``time_axis=False``: one decoding step (``[B, H, ...]``). ``validate=False``
    skips the value checks (never the shape checks), for inputs valid by construction (the layers)."""
    check_qkv(q, k, v, key_dim=structure.key_dim, time_axis=time_axis, validate=validate)
    gates = check_gates(structure, q, gates, time_axis=time_axis)
    if validate:
        check_gate_values(structure, gates, k)
    return parameterize(structure, q, k, v, gates)


def check_output(y, backend: str) -> None:
    """Finite inputs must give a finite readout: a lowering that lost its numerics says so, never a silent
    NaN."""
    check_values(
        "output y", y, _finite,
        f"finite readouts; the {backend!r} lowering produced non-finite values from finite, valid inputs "
        f"(in {y.dtype}), a loss of precision (e.g. very large precisions beta); use float64 inputs, "
        "a smaller range of beta, or backend='sequential'")


# ----------------------------------------------------------------------------------------------------
# The state.


def check_state(structure: Structure, state, *, batch: int, heads: int, key_dim: int, value_dim: int,
                dtype, name: str = "initial_state") -> FilterState:
    """A user's initial state, checked and cast to ``dtype``, or the prior one (`prior_state`) for None.

    ``name`` is the argument as the user wrote it (``state`` for `Filter.step`), for the messages."""
    if state is None:
        return prior_state(structure, batch=batch, heads=heads, key_dim=key_dim, value_dim=value_dim,
                           dtype=dtype)
    exact = structure.family == "exact"
    accepted = ("FilterState(mean, covariance) as a filter returns it, a (mean, covariance) tuple, or the "
                "mean S [B, H, K, V] alone")
    if isinstance(state, (tuple, list)):
        if len(state) not in (1, 2):
            raise FilterInputError(f"{name}: got a {type(state).__name__} of {len(state)} items; accepted: "
                                   f"{accepted}.")
        mean, cov = (tuple(state) + (None,))[:2]
    elif hasattr(state, "shape"):
        mean, cov = state, None
    else:
        raise FilterInputError(f"{name}: got {type(state).__name__}; accepted: {accepted}.")
    expected = (batch, heads, key_dim, value_dim)
    if not hasattr(mean, "shape") or tuple(mean.shape) != expected:
        transposed = (batch, heads, value_dim, key_dim)
        hint = (" (this is the transposed layout [B, H, V, K]; the state is keys by values, as in "
                "flash-linear-attention: transpose it with swapaxes(-1, -2))"
                if tuple(getattr(mean, "shape", ())) == transposed else "")
        _shape_error(f"{name}.mean", getattr(mean, "shape", ()), f"S [B, H, K, V] = {expected}{hint}")
    mean = jnp.asarray(mean).astype(dtype)
    if not exact:
        if cov is not None:
            raise FilterInputError(
                f"{name}.covariance: the {structure.family} family carries no covariance (it drops "
                "out of the mean recursion); accepted: FilterState(mean, None) or the mean alone.")
        return FilterState(mean, None)
    if cov is None:
        return FilterState(mean, prior_state(structure, batch=batch, heads=heads, key_dim=key_dim,
                                             value_dim=value_dim, dtype=dtype).covariance)
    expected = (batch, heads, key_dim, key_dim)
    if tuple(getattr(cov, "shape", ())) != expected:
        _shape_error(f"{name}.covariance", getattr(cov, "shape", ()), f"P [B, H, K, K] = {expected}")
    if is_concrete(cov):   # a covariance is checked where it is concrete (eager calls), on the host
        p = np.asarray(cov, dtype=np.float64)
        scale = max(1.0, float(np.abs(p).max()))
        if not np.all(np.isfinite(p)) or np.abs(p - np.swapaxes(p, -1, -2)).max() > 1e-6 * scale:
            raise FilterInputError(f"{name}.covariance: not symmetric (or not finite); accepted: "
                                   "symmetric positive semi-definite K x K matrices.")
        smallest = float(np.linalg.eigvalsh(p).min())
        if smallest < -1e-6 * scale:
            raise FilterInputError(
                f"{name}.covariance: not positive semi-definite (smallest eigenvalue {smallest:.3g}); "
                "accepted: symmetric positive semi-definite K x K matrices.")
    return FilterState(mean, jnp.asarray(cov).astype(dtype))
