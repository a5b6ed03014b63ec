"""`compile`: the one dispatch point from a design model to a filter.

The compiler takes the declared structure (`filters.structure`), picks the lowering (`filters.lowering`:
the one interface, its registry and ``auto``), checks that it applies and that it takes the options
given, and returns a `Filter` whose call, step and state have the same form on every backend.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

import designmodels as dm
from filters import associative, chunked, kalman, packed, sequential
from filters.checks import FilterInputError, check_output, check_state, prepare
from filters.inputs import FilterState, prior_state
from filters.pallas import lowering as pallas_lowering
from filters.lowering import LOWERINGS, BackendError, FilterOutput, Lowering, applicable, auto, register
from filters.structure import Structure, analyze


# The built-in lowerings, in the order `explain` and the messages list them; other modules register theirs
# (`filters.lowering.register`).
for _lowering_module in (sequential, associative, chunked, pallas_lowering):
    register(_lowering_module.LOWERING)


def _lowering(structure: Structure, backend: str, diagnostics: bool) -> Lowering:
    if backend == "auto":
        return auto(structure, diagnostics=diagnostics)
    if not isinstance(backend, str) or backend not in LOWERINGS:
        hint = dm.did_you_mean(backend.lower(), ["auto", *LOWERINGS]) if isinstance(backend, str) else ""
        raise BackendError(
            f"backend={backend!r}: unknown{hint}; accepted: 'auto', {', '.join(repr(b) for b in LOWERINGS)}.")
    lowering = LOWERINGS[backend]
    reason = lowering.reason_not_applicable(structure)
    if reason:
        raise BackendError(f"backend={backend!r} does not apply to this design model: {reason}; "
                           f"accepted here: {', '.join(applicable(structure))}.")
    if diagnostics and not lowering.supports_diagnostics(structure):
        accepted = applicable(structure, diagnostics=True)
        raise BackendError(
            f"diagnostics=True: the {backend!r} backend does not report per-step diagnostics for the "
            f"{structure.family} family; accepted: backend={' or '.join(map(repr, accepted))} (or 'auto').")
    return lowering


def _check_options(options: dict, backend: str, lowering: Lowering) -> None:
    """Each option is checked by the lowering that will use it (`Lowering.options`; two lowerings may
    accept different values of one option, e.g. ``chunk_size``), or, when ``auto`` chose a lowering that
    does not take it, by the lowerings that do: the value is kept if one of them accepts it (``auto``
    may pick that one on another platform) and refused with each one's reason if none does."""
    for name, value in options.items():
        owners = [l for l in LOWERINGS.values() if name in l.options]
        if not owners:
            known = sorted({o for l in LOWERINGS.values() for o in l.options})
            raise BackendError(f"{name}={value!r}: not a compile option{dm.did_you_mean(name, known)}; "
                               f"accepted: {', '.join(known)}.")
        if backend != "auto" and lowering not in owners:
            names = [repr(l.name) for l in owners]
            raise BackendError(f"{name}={value!r}: an option of the {' and '.join(names)} "
                               f"lowering{'s' if len(names) > 1 else ''}, which backend={backend!r} does not "
                               f"use; accepted: backend={' or '.join(names)} (or "
                               f"'auto'), or drop {name}.")
        if lowering in owners:
            lowering.options[name](value)
            continue
        reasons = []
        for owner in owners:
            try:
                owner.options[name](value)
            except BackendError as error:
                reasons.append(str(error))
            else:
                break
        else:
            raise BackendError(" ".join(reasons) if len(reasons) == 1 else
                               f"{name}={value!r}: no lowering that takes it accepts it: " + " ".join(reasons))


class Filter:
    """A compiled filter. Call it on a whole sequence, or `step` it one token at a time.

    ``y, state = f(q, k, v, initial_state=None, **gates)``; with ``diagnostics=True`` (at compile or
    call time) ``y, state, Diagnostics`` (write gain, predictive variance and ``log p(v_t | v_<t)``,
    `filters.kalman`). Shapes and dtypes are always checked; values (and a finite
    readout) are checked too (`filters.checks`): at once when they are concrete, and under ``jit``,
    ``grad``, ``vmap`` or ``scan`` when the computation runs (JAX then raises ``jax.errors.JaxRuntimeError``
    carrying the `FilterInputError` message; `filters.reraise_input_errors` gives the `FilterInputError`
    itself). ``validate=False`` skips the value checks for inputs valid by construction (the layers). ``y [B,T,H,V]`` has the dtype of ``v``; the state is a
    `FilterState` in the compute dtype (float32, or float64 when the inputs are).

    **Packed sequences** (`filters.packed`): ``f(q, k, v, cu_seqlens=cu, **gates)`` on one row
    ``[1, T, H, ...]`` holding ``N`` sequences end to end, sequence ``n`` at steps
    ``cu[n] <= t < cu[n + 1]`` (``cu [N + 1]`` integers, ``cu[0] = 0``, non-decreasing, ``cu[N] = T``, as
    fla and FlashAttention take them), equals filtering each sequence alone: the state restarts at every
    boundary from the prior, or from ``initial_state[n]`` (``S [N, H, K, V]``, one per sequence), and the
    final state is one per sequence, ``[N, H, K, V]``. Every lowering runs it (on the sequences padded
    to ``max_seqlen`` steps, a static shape: computed from ``cu`` when it is concrete, required under
    ``jit``).
    """

    def __init__(self, model: dm.DesignModel, backend: str = "auto", diagnostics: bool = False,
                 options: tuple = ()):
        self.model = model
        self.structure = analyze(model)
        self.requested_backend = backend
        self.diagnostics = diagnostics
        self.lowering = _lowering(self.structure, backend, diagnostics)
        self.options = dict(options)
        _check_options(self.options, backend, self.lowering)
        # The lowerings are pure functions of the structure: compile them once per filter. Inputs are
        # checked eagerly (outside jit), so bad values still raise.
        self._run = jax.jit(self._lower, static_argnames=("backend", "diagnostics", "max_seqlen"))
        self._step = jax.jit(self._one_step)

    def _one_step(self, state, x, stationary):
        with jax.default_matmul_precision("float32"):
            return kalman.step(self.structure, state, x.in_compute_dtype(), stationary)

    def _lower(self, x, state, cu=None, *, backend, diagnostics, max_seqlen=None):
        lowering = LOWERINGS[backend]
        options = {n: v for n, v in self.options.items() if n in lowering.options}
        plan = None
        if cu is not None:   # a packed row: every lowering runs the padded batch (filters.packed)
            plan = packed.layout(cu, x.q.shape[1], max_seqlen)
            x = packed.unpack(self.structure, x, plan)
        # Full float32 products: GPUs otherwise multiply float32 in TF32 (10-bit mantissa), which costs
        # the chunked and associative forms three digits against the sequential one.
        with jax.default_matmul_precision("float32"):
            out = lowering.run(self.structure, x, state, diagnostics=diagnostics, **options)  # FilterOutput
        if plan is None:
            return out
        diags = None if out.diagnostics is None else type(out.diagnostics)(
            *(packed.repack(d, plan) for d in out.diagnostics))
        return FilterOutput(packed.repack(out.y, plan), out.state, diags)

    @property
    def backend(self) -> str:
        return self.lowering.name

    def __repr__(self):
        return f"Filter({self.model.name or 'user-declared'}, family={self.structure.family}, backend={self.backend})"

    def init_state(self, batch: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32) -> FilterState:
        """The prior state: ``S_0 = 0`` and, for the exact family, ``P_0`` from the prior."""
        return prior_state(self.structure, batch=batch, heads=heads, key_dim=key_dim, value_dim=value_dim,
                           dtype=dtype)

    def _state(self, state, x, time_axis, batch=None):
        """The initial state checked against the inputs ``x`` (``batch`` states: one per packed sequence),
        in their compute dtype."""
        heads = x.q.shape[2] if time_axis else x.q.shape[1]
        batch = batch if batch is not None else x.q.shape[0]
        return check_state(self.structure, state, batch=batch, heads=heads, key_dim=x.q.shape[-1],
                           value_dim=x.v.shape[-1], dtype=x.compute_dtype,
                           name="initial_state" if time_axis else "state")

    def __call__(self, q, k, v, *, initial_state=None, diagnostics: Optional[bool] = None,
                 validate: bool = True, cu_seqlens=None, max_seqlen: Optional[int] = None, **gates):
        lowering = self.lowering
        if diagnostics is None:
            diagnostics = self.diagnostics
        elif diagnostics != self.diagnostics:
            lowering = _lowering(self.structure, self.requested_backend, diagnostics)
        x = prepare(self.structure, q, k, v, gates, validate=validate)
        cu, sequences = None, None
        if cu_seqlens is not None:
            cu, max_seqlen = packed.check_cu_seqlens(cu_seqlens, batch=x.q.shape[0], total=x.q.shape[1],
                                                     max_seqlen=max_seqlen, validate=validate)
            sequences = cu.shape[0] - 1
        elif max_seqlen is not None:
            raise FilterInputError(f"max_seqlen={max_seqlen!r}: the padded length of packed sequences, given "
                                   "without cu_seqlens; accepted: both (a packed row) or neither.")
        state = self._state(initial_state, x, time_axis=True, batch=sequences)
        out = self._run(x, state, cu, backend=lowering.name, diagnostics=diagnostics, max_seqlen=max_seqlen)
        if validate:
            check_output(out.y, lowering.name)
        y = out.y.astype(v.dtype)
        return (y, out.state, out.diagnostics) if diagnostics else (y, out.state)

    def step(self, state, q, k, v, *, validate: bool = True, **gates):
        """One decoding step: ``q, k [B,H,K]``, ``v [B,H,V]``, gates ``[B,H]``; returns ``(y, state)``.

        Agrees with the parallel forms: ``f(q, k, v)`` equals stepping through ``t = 0 .. T-1``.
        """
        x = prepare(self.structure, q, k, v, gates, time_axis=False, validate=validate)
        state = self._state(state, x, time_axis=False)
        stationary = self.structure.stationary_covariance(q.shape[-1])
        stationary = None if stationary is None else jnp.asarray(stationary, x.compute_dtype)
        y, state, _ = self._step(state, x, stationary)
        if validate:
            check_output(y, "step")
        return y.astype(v.dtype), state


@functools.lru_cache(maxsize=256)
def _compile_cached(model, backend, diagnostics, options):
    return Filter(model, backend, diagnostics, options)


def compile(model: dm.DesignModel, backend: str = "auto", *, diagnostics: bool = False,  # noqa: A001
            **options) -> Filter:
    """Lower a design model to a `Filter`.

    Args:
      model: any `designmodels.DesignModel` (a named one or one you declare).
      backend: ``"sequential"``, ``"associative"``, ``"chunked"`` or ``"auto"`` (the fastest that applies
        here).
      diagnostics: also return the per-step `Diagnostics` (write gain, predictive variance, and the log
        predictive density ``log p(v_t | v_<t)`` of the values, whose sum over time is the marginal
        log-likelihood; None for the additive family). Off by default, and then not computed.
      **options: lowering options, e.g. ``chunk_size`` (default 64) for ``"chunked"``.

    Raises:
      BackendError: the backend is unknown or does not apply; the message lists those that do.
    """
    analyze(model)  # type check before hashing
    # Filters are immutable: one per (model, backend, diagnostics), so jit caches are reused.
    return _compile_cached(model, backend, diagnostics, tuple(sorted(options.items())))


def explain(model: dm.DesignModel) -> str:
    """A readable account of the structure analysis and of the lowerings that apply."""
    structure = analyze(model)
    lines = [model.describe(), "", "Structure analysis:",
             f"  family      {structure.family}",
             f"  transition  {structure.transition}",
             f"  noise       {structure.noise}"]
    if structure.family == "reset":
        lines.append("  reset       " + ("run-time write strength eta = beta" if structure.write_strength
                                         else f"sigma^2 = {structure.reset_variance}"))
    inputs = structure.runtime_inputs
    lines.append("  run-time    " + (", ".join(
        f"{s.name} [B,T,H{''.join(',' + d for d in s.trailing)}]{'' if s.required else ' (optional)'}"
        for s in inputs.values()) or "none besides q, k, v"))
    lines += ["", "Lowerings:"]
    for name, lowering in LOWERINGS.items():
        reason = lowering.reason_not_applicable(structure)
        lines.append(f"  {name:12s}" + (f"applies: {lowering.summary}" if not reason else f"does not apply: {reason}"))
    lines.append(f"  auto        -> {auto(structure).name} on {jax.default_backend()}")
    return "\n".join(lines)
