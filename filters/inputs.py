"""Run-time inputs: checked once at the boundary, then normalized so that every lowering sees one form.

Shape legend (the layout of the PyTorch peer ``flash-linear-attention``)::

    q, k   [B, T, H, K]      queries and keys (Mamba-2: C and B)
    v      [B, T, H, V]      values (Mamba-2: x)
    gates  [B, T, H]         per step and head (``log_decay`` of a diagonal transition: [B, T, H, K])
    S      [B, H, K, V]      the memory mean (flash-linear-attention's layout); the readout is
                             ``y_t = S_t^T q_t``
    P      [B, H, K, K]      the key-space covariance shared by every value row (exact family only)

Shapes and dtypes are always checked. Values are checked at once when they are concrete (eager calls:
numpy arrays on the host, jax arrays by a reduction on their device, so only a count is transferred);
under a transformation (``jit``, ``grad``, ``vmap``, ``scan``) a device-side count of the invalid entries
goes to a host callback that raises when the computation runs (under ``jit`` it arrives wrapped in jax's
runtime error, with this module's message inside). ``validate=False`` skips the value checks; the
layers use it, since their gates are valid by construction.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from designmodels import did_you_mean
from filters.structure import Structure


class FilterInputError(ValueError):
    """A run-time input with a wrong shape, rank, dtype or value. The message says what is accepted."""


class FilterState(NamedTuple):
    """The state of a filter: ``mean`` ``S [B,H,K,V]`` and, for the exact family, ``covariance``
    ``P [B,H,K,K]`` (None for the additive and reset families, whose covariance drops out).

    ``S`` is in flash-linear-attention's layout, keys by values (``y_t = S_t^T q_t``), and there is no
    other: a state from fla (``[B, H, K, V]``) is passed as it is. A state in the transposed layout
    ``[B, H, V, K]`` is refused with a message that says so when ``K != V``; when ``K == V`` the shapes
    cannot tell the two apart, so transpose such a state yourself (``swapaxes(-1, -2)``).
    """

    mean: jax.Array
    covariance: Optional[jax.Array] = None


class StepInputs(NamedTuple):
    """Normalized per-step quantities, all ``[B, T, H, ...]``.

    ``q, k, v`` keep the dtype they came in (bfloat16 stays bfloat16, so that a kernel can multiply
    them on tensor cores); every other field is in the compute dtype (float32, or float64 when an input
    is). A lowering casts what it needs: `in_compute_dtype` casts ``q, k, v`` as well.

    ``transition``: None (identity), log decays (scalar or diagonal kind) or matrices (dense kind).
    ``write_strength``: the reset family's ``eta_t`` (the delta-rule step), ``reset_variance`` its
    ``sigma_t^2``. ``precision``: the exact family's ``beta_t``. ``input_scale``: the additive ``s_t``.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    transition: Optional[jax.Array] = None
    process_noise: Optional[jax.Array] = None
    precision: Optional[jax.Array] = None
    write_strength: Optional[jax.Array] = None
    reset_variance: Optional[jax.Array] = None
    input_scale: Optional[jax.Array] = None

    @property
    def compute_dtype(self):
        """float32, or float64 when any of ``q, k, v`` is float64 (never a narrower float)."""
        return compute_dtype(self.q, self.k, self.v)

    def in_compute_dtype(self) -> "StepInputs":
        """These inputs with ``q, k, v`` cast to the compute dtype too."""
        dtype = self.compute_dtype
        return self._replace(q=self.q.astype(dtype), k=self.k.astype(dtype), v=self.v.astype(dtype))


try:  # jax.core.Tracer is public in jax 0.10; keep working if a later release moves it
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


def is_concrete(x) -> bool:
    return x is not None and not isinstance(x, _Tracer)


def compute_dtype(*arrays):
    """float64 if any input is float64 (x64 on), else float32: accumulation never happens in bf16."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _shape_error(name, got, expected):
    raise FilterInputError(f"{name}: got shape {tuple(got)}; expected {expected}.")


def _report_invalid(name: str, shape: tuple, accepted: str, labels: tuple, count, flat, *values) -> None:
    """Raise the message of `_value_checker` (on the host: called directly, or from a device callback)."""
    count = int(count)
    if not count:
        return
    index = tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else ()
    shown = ", ".join(f"{label} = {float(value):.6g}" for label, value in zip(labels, values))
    raise FilterInputError(f"{name}: {count} invalid entries, first at index {index}: {shown}; "
                           f"accepted: {accepted}.")


def _value_checker(name: str, x, ok, accepted: str, *, shown: Optional[dict] = None):
    """Raise if ``x`` has entries outside ``ok(x, xp)`` (a boolean mask; ``xp`` is numpy or jax.numpy).

    The message gives the count, the first bad index and the value there (and the values of ``shown``,
    ``{label: array of x's shape}``, at that index). A concrete ``x`` is checked now; a traced one by a
    device-side reduction and a host callback that raises when the computation runs.
    """
    if x is None:
        return
    shown = shown or {name: x}
    arrays = [x, *shown.values()]
    if all(is_concrete(a) for a in arrays):
        # Host arrays are checked with numpy; device arrays on the device, so that only a count (and,
        # when something is wrong, one index and its values) crosses to the host, not the arrays.
        on_host = all(isinstance(a, (np.ndarray, np.generic, int, float)) for a in arrays)
        xp = np if on_host else jnp
        data = [np.asarray(a, dtype=np.float64) if on_host else jnp.asarray(a) for a in arrays]
        bad = ~xp.asarray(ok(data[0], xp))
        count = int(bad.sum())
        if count:
            flat = int(xp.argmax(bad.reshape(-1)))
            _report_invalid(name, tuple(bad.shape), accepted, tuple(shown), count, flat,
                            *(float(xp.broadcast_to(a, bad.shape).reshape(-1)[flat]) for a in data[1:]))
        return
    x = jnp.asarray(x)
    bad = ~ok(x, jnp)
    flat = jnp.argmax(bad.reshape(-1))
    values = [jnp.broadcast_to(jnp.asarray(a), bad.shape).reshape(-1)[flat] for a in shown.values()]
    jax.debug.callback(functools.partial(_report_invalid, name, bad.shape, accepted, tuple(shown)),
                       jnp.sum(bad), flat, *values)


def _finite(x, xp):
    return xp.isfinite(x)


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
            _value_checker(name, x, _finite, "finite values")
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


def prepare(structure: Structure, q, k, v, gates: dict, *, time_axis: bool = True,
            validate: bool = True) -> StepInputs:
    """Check the gates against the model's declared run-time inputs and normalize everything.

    With ``time_axis=False`` the inputs are one step (``[B, H, ...]``), as `Filter.step` takes them.
    ``validate=False`` skips the value checks (never the shape checks): for callers whose inputs are
    valid by construction, such as the layers.
    """
    model_name = structure.name or "user-declared"
    batch, time, heads, key_dim, _ = check_qkv(q, k, v, key_dim=structure.key_dim, time_axis=time_axis,
                                               validate=validate)
    check = _value_checker if validate else (lambda *args, **kwargs: None)
    specs = structure.runtime_inputs
    unknown = sorted(set(gates) - set(specs))
    if unknown:
        keywords = ("initial_state", "diagnostics", "validate") if time_axis else ("validate",)
        hints = "".join(did_you_mean(u, [*specs, *keywords]) for u in unknown)
        raise FilterInputError(
            f"{', '.join(unknown)}: not an input of this design model ({model_name})"
            f"{hints}; accepted keyword inputs: {', '.join(specs) or 'none besides q, k, v'} "
            f"(and the options {', '.join(keywords)}).")
    lead = (batch, time, heads) if time_axis else (batch, heads)
    lead_text = "[B, T, H" if time_axis else "[B, H"
    dtype = compute_dtype(q, k, v)
    values = {}
    for name, spec in specs.items():
        x = gates.get(name)
        layout = f"{lead_text}{''.join(', ' + d for d in spec.trailing)}]"
        if x is None:
            if spec.required:
                raise FilterInputError(
                    f"{name}: missing; this design model ({model_name}) takes it at run "
                    f"time with shape {layout} ({spec.accepted}); pass it by keyword, {name}=...")
            continue
        x = _as_gate(name, x)
        expected = (*lead, *(key_dim for _ in spec.trailing))
        if x.shape != expected:
            _shape_error(name, x.shape, f"{layout} = {expected} ({spec.accepted}); {lead_text[1:]} are read from "
                                        f"q of shape {tuple(q.shape)}, layout {lead_text}, K]")
        values[name] = x.astype(dtype)

    q, k, v = (jnp.asarray(x) for x in (q, k, v))        # in their own dtype (see StepInputs)
    ones = jnp.ones(lead, dtype)
    transition = _transition(structure, values, ones, key_dim, check)
    fields = dict(q=q, k=k, v=v, transition=transition)

    if structure.noise == "random_walk":
        fixed = structure.fixed_process_noise
        fields["process_noise"] = values["process_noise"] if fixed is None else fixed * ones
        check("process_noise", fields["process_noise"], lambda x, xp: xp.isfinite(x) & (x >= 0),
              "finite values >= 0")

    if structure.family == "additive":
        fields["input_scale"] = values.get("input_scale")
        check("input_scale", fields["input_scale"], _finite, "finite values")
        return StepInputs(**fields)

    beta = values["beta"] if structure.fixed_precision is None else structure.fixed_precision * ones
    key_norm2 = jnp.sum(jnp.square(k.astype(dtype)), axis=-1)
    if structure.family == "exact":
        check("beta", beta, _positive, "finite precisions beta > 0 (beta is the precision 1 / noise variance)")
        fields["precision"] = beta
    elif structure.write_strength:
        check("beta", beta * key_norm2, lambda x, xp: xp.isfinite(x) & (x >= 0) & (x < 1),
              "write strengths with 0 <= beta_t |k_t|^2 < 1 (a delta-rule step is a covariance "
              "reset only then: sigma^2 = beta / (1 - beta |k|^2) > 0; with unit keys, beta in "
              "[0, 1), e.g. beta = sigmoid(x)); larger steps are not representable as a design model",
              shown={"beta_t |k_t|^2": beta * key_norm2, "beta_t": beta, "|k_t|^2": key_norm2})
        fields["write_strength"] = beta
        fields["reset_variance"] = beta / (1 - beta * key_norm2)
    else:
        check("beta", beta, _positive, "finite precisions beta > 0 (beta is the precision 1 / noise variance)")
        sigma2 = structure.reset_variance
        fields["write_strength"] = sigma2 * beta / (1 + sigma2 * beta * key_norm2)
        fields["reset_variance"] = sigma2 * ones
    return StepInputs(**fields)


def _positive(x, xp):
    return xp.isfinite(x) & (x > 0)


_LOG_DECAY = "finite log decays <= 0 (decays in (0, 1]; pass log a_t, e.g. -softplus(x), not a_t itself)"


def _log_decay(x, xp):
    return xp.isfinite(x) & (x <= 0)


def _transition(structure: Structure, values: dict, ones, key_dim: int, check):
    """The transition in normalized form (see `filters.transitions`), fixed values broadcast."""
    fixed = structure.fixed_transition
    kind = structure.transition
    dtype = ones.dtype
    if kind == "identity":
        return None
    if kind == "scalar":
        if fixed is not None:
            return fixed * ones
        x = values.get("log_decay")
        check("log_decay", x, _log_decay, _LOG_DECAY)
        return x
    if kind == "diagonal":
        if fixed is not None:
            return ones[..., None] * jnp.asarray(fixed, dtype)
        x = values["log_decay"]
        check("log_decay", x, _log_decay, _LOG_DECAY)
        return x
    if fixed is not None:
        return ones[..., None, None] * jnp.asarray(fixed, dtype)
    x = values["transition"]
    check("transition", x, _finite, "finite matrices")
    return x


def initial_state(structure: Structure, state, *, batch: int, heads: int, key_dim: int, value_dim: int,
                  dtype, name: str = "initial_state") -> FilterState:
    """Check a user's initial state, or build the prior one: ``S_0 = 0``, ``P_0`` from the prior.

    ``name`` is the argument as the user wrote it (``state`` for `Filter.step`), for the messages."""
    exact = structure.family == "exact"
    if state is None:
        mean = jnp.zeros((batch, heads, key_dim, value_dim), dtype)
        cov = None
        if exact:
            p0 = jnp.asarray(structure.prior_covariance(key_dim), dtype)
            cov = jnp.broadcast_to(p0, (batch, heads, key_dim, key_dim))
        return FilterState(mean, cov)
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
        cov = jnp.broadcast_to(jnp.asarray(structure.prior_covariance(key_dim), dtype),
                               (batch, heads, key_dim, key_dim))
    expected = (batch, heads, key_dim, key_dim)
    if tuple(getattr(cov, "shape", ())) != expected:
        _shape_error(f"{name}.covariance", getattr(cov, "shape", ()), f"P [B, H, K, K] = {expected}")
    cov = jnp.asarray(cov).astype(dtype)
    if is_concrete(cov):
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
    return FilterState(mean, cov)
