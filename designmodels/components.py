"""The components of a design model: frozen, self-validating dataclasses.

A design model is a linear-Gaussian state-space model over the memory matrix ``S`` (``K x V``: keys by
values, the layout of flash-linear-attention and of the filters' state; the design document writes its
transpose ``V x K``)::

    S_0 ~ MN(0, P_0, I_V)                           prior: every value column is N(0, P_0) over keys
    S_t = A_t S_{t-1} + W_t (+ U_t)                 transition, W_t ~ MN(0, Q_t, I_V)
    v_t = S_t^T k_t + e_t, e_t ~ N(0, I_V / beta_t) observation (key = address, value = evidence)

Each component below declares one of these pieces. A quantity given as a number is *fixed*; a quantity
given as ``None`` is *input-dependent*: the compiled filter then takes it at run time under the name in
the component's docstring. Components check their own values; `DesignModel` checks how they combine.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Literal, Optional, Union

import numpy as np


class DesignModelError(ValueError):
    """A design model that is impossible or badly parameterized. The message names the field."""


def did_you_mean(word, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to a misspelled ``word``, else ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _fail(field: str, got, accepted: str) -> None:
    """``field: got <repr of got>; accepted: ...``."""
    raise DesignModelError(f"{field}: got {got!r}; accepted: {accepted}.")


def _fail_as(field: str, description: str, accepted: str) -> None:
    """``field: got <description>; accepted: ...`` (``description`` in words, not a value)."""
    raise DesignModelError(f"{field}: got {description}; accepted: {accepted}.")


def _is_number(value) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _number(value, field: str, ok, accepted: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool) with ``ok(value)``, else fail."""
    if not (_is_number(value) and math.isfinite(value) and ok(float(value))):
        _fail(field, value, accepted)
    return float(value)


def _flag(value, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        _fail(field, value, "True or False")
    return bool(value)


def _as_array(value, field: str, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        _fail(field, value, what + " of real numbers")


def _as_matrix(value, field: str) -> tuple:
    array = _as_array(value, field, "a square K x K matrix")
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        _fail_as(field, f"an array of shape {array.shape}", "a square K x K matrix (K >= 1)")
    if not np.all(np.isfinite(array)):
        _fail_as(field, f"a matrix with non-finite entries, first at {_first(~np.isfinite(array))}",
                 "finite entries")
    return tuple(tuple(float(x) for x in row) for row in array)


def _as_vector(value, field: str) -> tuple:
    array = _as_array(value, field, "a vector of length K")
    if array.ndim != 1 or array.shape[0] == 0:
        _fail_as(field, f"an array of shape {array.shape}", "a non-empty vector of length K, e.g. (1.0, 0.5)")
    if not np.all(np.isfinite(array)):
        _fail_as(field, f"a non-finite entry at {_first(~np.isfinite(array))}", "finite entries")
    return tuple(float(x) for x in array)


def _first(mask: np.ndarray) -> str:
    index = tuple(int(i) for i in np.argwhere(mask)[0])
    return f"index {index[0] if len(index) == 1 else index}"


# ----------------------------------------------------------------------------------------------------
# Prior covariance P_0 (shared by every value row).


@dataclasses.dataclass(frozen=True)
class IsotropicCovariance:
    """``P_0 = variance * I``."""

    variance: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "variance", _number(self.variance, "IsotropicCovariance.variance",
                                                     lambda x: x > 0, "a finite number > 0"))

    key_dim = None

    def array(self, key_dim: int) -> np.ndarray:
        return self.variance * np.eye(key_dim)


@dataclasses.dataclass(frozen=True)
class DiagonalCovariance:
    """``P_0 = diag(variances)``; fixes the key dimension ``K = len(variances)``."""

    variances: tuple

    def __post_init__(self):
        variances = _as_vector(self.variances, "DiagonalCovariance.variances")
        if min(variances) <= 0:
            bad = np.asarray(variances) <= 0
            _fail_as("DiagonalCovariance.variances", f"{variances} with {int(bad.sum())} entries <= 0, first at "
                     f"{_first(bad)}", "every variance > 0 (a variance of 0 would fix that key channel forever)")
        object.__setattr__(self, "variances", variances)

    @property
    def key_dim(self) -> int:
        return len(self.variances)

    def array(self, key_dim: int) -> np.ndarray:
        return np.diag(self.variances)


@dataclasses.dataclass(frozen=True)
class FullCovariance:
    """A full symmetric positive-definite ``P_0``; fixes ``K``."""

    matrix: tuple

    def __post_init__(self):
        matrix = np.asarray(_as_matrix(self.matrix, "FullCovariance.matrix"))
        if not np.allclose(matrix, matrix.T, rtol=1e-10, atol=1e-12):
            gap = np.abs(matrix - matrix.T)
            _fail_as("FullCovariance.matrix", f"a non-symmetric matrix (P[i, j] != P[j, i], largest difference "
                     f"{gap.max():.3g} at {_first(gap == gap.max())})",
                     "a symmetric positive-definite matrix; symmetrize it with (P + P.T) / 2 if that was meant")
        smallest = float(np.linalg.eigvalsh(matrix).min())
        if smallest <= 0:
            _fail_as("FullCovariance.matrix", f"a matrix with smallest eigenvalue {smallest:.3g}",
                     "a positive-definite matrix (every eigenvalue > 0), e.g. L @ L.T + eps * I")
        object.__setattr__(self, "matrix", _as_matrix(matrix, "FullCovariance.matrix"))

    @property
    def key_dim(self) -> int:
        return len(self.matrix)

    def array(self, key_dim: int) -> np.ndarray:
        return np.asarray(self.matrix)


PriorCovariance = Union[IsotropicCovariance, DiagonalCovariance, FullCovariance]


@dataclasses.dataclass(frozen=True)
class Prior:
    """``S_0 ~ MN(0, P_0, I_V)``. The prior mean is zero; a filter call may start elsewhere by passing
    an ``initial_state``."""

    covariance: PriorCovariance = IsotropicCovariance(1.0)

    def __post_init__(self):
        if not isinstance(self.covariance, (IsotropicCovariance, DiagonalCovariance, FullCovariance)):
            _fail("Prior.covariance", self.covariance,
                  "an instance of IsotropicCovariance, DiagonalCovariance or FullCovariance, e.g. "
                  "Prior(IsotropicCovariance(1.0))")


# ----------------------------------------------------------------------------------------------------
# Transition A_t.


@dataclasses.dataclass(frozen=True)
class Identity:
    """``A_t = I``: memory never fades on its own."""

    key_dim = None


@dataclasses.dataclass(frozen=True)
class ScalarDecay:
    """``A_t = a_t I`` with ``a_t in (0, 1]``.

    ``decay`` fixed (a number), or ``None``: input-dependent, taken at run time as ``log_decay``
    ``[B, T, H]`` (``log a_t <= 0``). With ``required=False`` a call may omit ``log_decay`` and
    the transition is then the identity.
    """

    decay: Optional[float] = None
    required: bool = True

    key_dim = None

    def __post_init__(self):
        if self.decay is not None:
            object.__setattr__(self, "decay", _number(
                self.decay, "ScalarDecay.decay", lambda a: 0 < a <= 1,
                "a number in (0, 1], or None for an input-dependent decay (given at run time as log_decay)"))
        object.__setattr__(self, "required", _flag(self.required, "ScalarDecay.required"))
        if self.decay is not None and not self.required:
            _fail("ScalarDecay.required", False, "True when the decay is fixed (only run-time decays are optional)")


@dataclasses.dataclass(frozen=True)
class DiagonalDecay:
    """``A_t = diag(a_t)``, channel-wise decay in (0, 1].

    ``decays`` fixed (a length-``K`` vector), or ``None``: taken at run time as ``log_decay``
    ``[B, T, H, K]``.
    """

    decays: Optional[tuple] = None

    def __post_init__(self):
        if self.decays is not None:
            decays = _as_vector(self.decays, "DiagonalDecay.decays")
            bad = ~((np.asarray(decays) > 0) & (np.asarray(decays) <= 1))
            if bad.any():
                _fail_as("DiagonalDecay.decays", f"{decays}, entry {_first(bad)} outside (0, 1]",
                         "every decay in (0, 1] (decays, not log decays), or None for run-time log_decay")
            object.__setattr__(self, "decays", decays)

    @property
    def key_dim(self):
        return None if self.decays is None else len(self.decays)


@dataclasses.dataclass(frozen=True)
class DenseTransition:
    """A dense ``A_t`` (``K x K``).

    ``matrix`` fixed, or ``None``: taken at run time as ``transition`` ``[B, T, H, K, K]``.
    """

    matrix: Optional[tuple] = None

    def __post_init__(self):
        if self.matrix is not None:
            object.__setattr__(self, "matrix", _as_matrix(self.matrix, "DenseTransition.matrix"))

    @property
    def key_dim(self):
        return None if self.matrix is None else len(self.matrix)


Transition = Union[Identity, ScalarDecay, DiagonalDecay, DenseTransition]


# ----------------------------------------------------------------------------------------------------
# Process noise Q_t.


@dataclasses.dataclass(frozen=True)
class NoProcessNoise:
    """``Q_t = 0``."""


@dataclasses.dataclass(frozen=True)
class RandomWalk:
    """``Q_t = q_t I``: every direction forgets at rate ``q_t >= 0``.

    ``variance`` fixed, or ``None``: taken at run time as ``process_noise`` ``[B, T, H]``.
    """

    variance: Optional[float] = 0.0

    def __post_init__(self):
        if self.variance is not None:
            object.__setattr__(self, "variance", _number(
                self.variance, "RandomWalk.variance", lambda x: x >= 0,
                "a finite number >= 0, or None for an input-dependent one (given at run time as process_noise)"))


@dataclasses.dataclass(frozen=True)
class Stationary:
    """``Q_t = P_s - A_t P_s A_t^T``: keeps ``P_s`` stationary (an AR(1) / Ornstein-Uhlenbeck memory).

    ``P_s = variance * I``, or the prior covariance when ``variance`` is None (the prior then stays the
    stationary distribution and the model forgets towards it).
    """

    variance: Optional[float] = None

    def __post_init__(self):
        if self.variance is not None:
            object.__setattr__(self, "variance", _number(
                self.variance, "Stationary.variance", lambda x: x > 0,
                "a finite number > 0, or None for the prior covariance"))


@dataclasses.dataclass(frozen=True)
class KeyNoise:
    """``Q_t = q_t k_t k_t^T``: noise along the key about to be written, so that a write replaces.

    Added in the prediction before the write at ``t`` (``P_bar_t = A_t P A_t^T + q_t k_t k_t^T``), it says
    that the content at ``k_t`` has changed and nothing else has: ``P_bar_t k_t = A_t P A_t^T k_t +
    q_t |k_t|^2 k_t`` turns towards ``k_t`` and the gain ``k_t^T P_bar_t k_t / (k_t^T P_bar_t k_t + 1 /
    beta_t)`` tends to 1 as ``q_t |k_t|^4`` grows, however often ``k_t`` was written before, while the
    memory stays as sure as it was of the directions orthogonal to ``k_t``. (Without it, along a unit key
    written ``n`` times the gain falls like ``1 / (beta n)``.)

    ``variance`` fixed ``q >= 0``, or ``None``: taken at run time as ``process_noise`` ``[B, T, H]``, as
    `RandomWalk`'s. Every lowering of the exact family takes it (the chunked form and its Pallas kernels
    with a scalar or no decay: `filters.chunked`'s module doc).
    """

    variance: Optional[float] = None

    def __post_init__(self):
        if self.variance is not None:
            object.__setattr__(self, "variance", _number(
                self.variance, "KeyNoise.variance", lambda x: x >= 0,
                "a finite number >= 0, or None for an input-dependent one (given at run time as process_noise)"))


ProcessNoise = Union[NoProcessNoise, RandomWalk, Stationary, KeyNoise]


# ----------------------------------------------------------------------------------------------------
# Observation, or latent input.


@dataclasses.dataclass(frozen=True)
class KeyValueObservation:
    """``v_t = S_t k_t + e_t``, ``e_t ~ N(0, I / beta_t)``: the key addresses, the value is evidence.

    ``precision`` fixed (``beta > 0``), or ``None``: taken at run time as ``beta`` ``[B, T, H]``.
    Under ``Reset(write_strength=True)`` the run-time ``beta`` is the write strength instead (see `Reset`).
    """

    precision: Optional[float] = None

    def __post_init__(self):
        if self.precision is not None:
            object.__setattr__(self, "precision", _number(
                self.precision, "KeyValueObservation.precision", lambda x: x > 0,
                "a finite number > 0, or None for an input-dependent precision (given at run time as beta)"))


@dataclasses.dataclass(frozen=True)
class LatentInput:
    """No observation: a known input ``U_t = s_t k_t v_t^T`` enters the transition.

    The mean recursion is then ``S_t = A_t S_{t-1} + s_t k_t v_t^T`` (the additive family) and the
    covariance is data-independent. ``scaled=True`` takes ``s_t`` at run time as ``input_scale``
    ``[B, T, H]`` (Mamba-2's ``dt``); otherwise ``s_t = 1``.
    """

    scaled: bool = False

    def __post_init__(self):
        object.__setattr__(self, "scaled", _flag(self.scaled, "LatentInput.scaled"))


Observation = Union[KeyValueObservation, LatentInput]


# ----------------------------------------------------------------------------------------------------
# Covariance mode.


@dataclasses.dataclass(frozen=True)
class Exact:
    """Propagate the covariance exactly (the Kalman filter)."""


@dataclasses.dataclass(frozen=True)
class Reset:
    """Reset the predicted covariance to ``sigma_t^2 I`` before every update (the delta-rule family).

    The update is then the delta rule ``S_t = S_bar + eta_t k_t (v_t - S_bar^T k_t)^T`` with
    ``eta_t = sigma^2 beta_t / (1 + sigma^2 beta_t |k_t|^2)``.

    ``variance`` is ``sigma^2`` (fixed, > 0). With ``write_strength=True`` the run-time ``beta`` is
    ``eta_t`` itself (DeltaNet's parameterization), which is a reset exactly when
    ``0 < eta_t |k_t|^2 < 1`` (then ``sigma_t^2 = eta_t / (1 - eta_t |k_t|^2)`` in units of the
    observation noise); other write strengths are not representable and are rejected.
    """

    variance: float = 1.0
    write_strength: bool = False

    def __post_init__(self):
        object.__setattr__(self, "variance", _number(self.variance, "Reset.variance", lambda x: x > 0,
                                                     "a finite number > 0"))
        object.__setattr__(self, "write_strength", _flag(self.write_strength, "Reset.write_strength"))


CovarianceMode = Union[Exact, Reset]
Family = Literal["additive", "reset", "exact"]
