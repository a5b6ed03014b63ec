"""The one interface every lowering implements, and the registry that `compile`, `explain` and ``auto`` read.

A lowering is one way to evaluate the filter of a `Structure`: the sequential scan, the associative scan,
the chunked matmul form (and, on accelerators, fused kernels). Each is a `Lowering`: it says whether it
applies to a structure and why not, whether it reports per-step diagnostics, which compile options it
takes (each with its validator), and ``run`` evaluates it::

    run(structure, x: StepInputs, state: FilterState, *, diagnostics, **options) -> FilterOutput

``x`` is checked and normalized (`filters.inputs`), ``q, k, v`` in their input dtype and everything else
in the compute dtype; ``state`` is in the compute dtype. ``run`` returns the readouts ``y [B,T,H,V]`` (in
the compute dtype, or already in the values' dtype, which the filter returns) and the final state in the
compute dtype, and the `Diagnostics` when asked (and supported). It is called under ``jit`` with
full-float32 matrix products by default (a lowering that multiplies on tensor cores says so per product).

A new lowering subclasses `Lowering` and calls `register` (at import of its module); `compile`, `explain`
and ``backend="auto"`` then treat it like the built-in ones. ``auto`` takes the first lowering of
`AUTO_PREFERENCE` for the platform that is registered, applies (and reports diagnostics, if asked), then
any other registered one in registration order.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax

from filters import shapes
from filters.inputs import FilterState, StepInputs
from filters.kalman import Diagnostics


class BackendError(ValueError):
    """A lowering that does not exist, does not apply to this design model, or an option it refuses."""


class FilterOutput(NamedTuple):
    """What every lowering returns: ``y [B,T,H,V]``, the final `FilterState` and, when asked and
    supported, the per-step `Diagnostics` (else None); all in the compute dtype."""

    y: shapes.Readouts
    state: FilterState
    diagnostics: Optional[Diagnostics] = None


class Lowering(abc.ABC):
    """One way to evaluate a filter (see the module docstring). Subclasses set the class attributes and
    implement `reason_not_applicable` and `run`."""

    name: str                                          # the backend name: "sequential", "chunked", ...
    summary: str                                       # what it computes and its cost, for `explain`
    options: Mapping[str, Callable[[Any], None]] = {}  # compile option -> validator raising BackendError

    @abc.abstractmethod
    def reason_not_applicable(self, structure) -> Optional[str]:
        """Why this lowering does not cover ``structure`` (a clause for a message), or None if it does."""

    def supports_diagnostics(self, structure) -> bool:
        """Whether `run` reports per-step diagnostics for ``structure``."""
        return False

    def reason_auto_passes_over(self, structure) -> Optional[str]:
        """Why ``backend="auto"`` should not choose this lowering for ``structure`` although it applies
        (it was measured slower than the next preference, say), or None. Asking for it by name still
        works."""
        return None

    @abc.abstractmethod
    def run(self, structure, x: StepInputs, state: FilterState, *, diagnostics: bool,
            **options) -> FilterOutput:
        """Evaluate the filter over the whole sequence (see the module docstring)."""

    def __repr__(self):
        return f"<lowering {self.name!r}>"


LOWERINGS: dict[str, Lowering] = {}
"""The registered lowerings by name, in registration order (the order `explain` and messages list them)."""

AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("chunked", "sequential"),
    "gpu": ("pallas", "chunked", "associative"),
    "tpu": ("chunked", "associative"),
}
"""``backend="auto"``: per platform, the lowerings to try first, fastest first; names not registered are
skipped, and after them every registered lowering is tried in registration order."""


def register(lowering: Lowering) -> Lowering:
    """Add a lowering to `LOWERINGS` (a module that defines one calls this when it is imported)."""
    if not isinstance(lowering, Lowering):
        raise TypeError(f"filters.register: expected a filters.Lowering instance, got {type(lowering).__name__}.")
    name = getattr(lowering, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise BackendError(f"filters.register: a lowering's name must be a non-empty string other than "
                           f"'auto'; got {name!r}.")
    if name in LOWERINGS and LOWERINGS[name] is not lowering:
        raise BackendError(f"filters.register: a lowering named {name!r} is registered already "
                           f"({LOWERINGS[name]!r}); accepted: a new name.")
    LOWERINGS[name] = lowering
    return lowering


def applicable(structure, *, diagnostics: bool = False) -> list[str]:
    """The registered lowerings that apply to ``structure`` (and report diagnostics, if asked)."""
    return [name for name, lowering in LOWERINGS.items()
            if not lowering.reason_not_applicable(structure)
            and (not diagnostics or lowering.supports_diagnostics(structure))]


def auto(structure, *, diagnostics: bool = False, platform: Optional[str] = None) -> Lowering:
    """The lowering ``backend="auto"`` picks for ``structure`` on ``platform`` (default: jax's)."""
    platform = platform or jax.default_backend()
    candidates = applicable(structure, diagnostics=diagnostics)
    for name in (*AUTO_PREFERENCE.get(platform, ()), *LOWERINGS):
        if name in candidates and not LOWERINGS[name].reason_auto_passes_over(structure):
            return LOWERINGS[name]
    raise BackendError(f"backend='auto': no registered lowering applies to this design model"
                       f"{' with diagnostics' if diagnostics else ''}; registered: {', '.join(LOWERINGS)}.")
