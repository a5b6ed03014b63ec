"""The components of a design model: frozen, self-validating dataclasses.

A design model is a linear-Gaussian state-space model over the memory matrix ``S`` (``V x K``)::

    S_0 ~ MN(M_0, I_V (x) P_0)                      prior
    S_t = S_{t-1} A_t^T + W_t (+ U_t)               transition, W_t ~ MN(0, I_V (x) Q_t)
    v_t = S_t k_t + e_t,   e_t ~ N(0, I_V / beta_t) observation (key = address, value = evidence)

Each component below declares one of these pieces. A quantity given as a number is *fixed*; a quantity
given as ``None`` is *input-dependent*: the compiled filter then takes it at run time under the name in
the component's docstring. Components check their own values; `DesignModel` checks how they combine.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union

import numpy as np


class DesignModelError(ValueError):
    """A design model that is impossible or badly parameterized. The message names the field."""


def _fail(field: str, got, accepted: str) -> None:
    raise DesignModelError(f"{field}: got {got!r}; accepted: {accepted}.")


def _as_matrix(value, field: str) -> tuple:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        _fail(field, f"array of shape {array.shape}", "a square K x K matrix")
    if not np.all(np.isfinite(array)):
        _fail(field, "a matrix with non-finite entries", "finite entries")
    return tuple(tuple(float(x) for x in row) for row in array)


def _as_vector(value, field: str) -> tuple:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] == 0:
        _fail(field, f"array of shape {array.shape}", "a non-empty vector of length K")
    if not np.all(np.isfinite(array)):
        _fail(field, "a vector with non-finite entries", "finite entries")
    return tuple(float(x) for x in array)


# ----------------------------------------------------------------------------------------------------
# Prior covariance P_0 (shared by every value row).


@dataclasses.dataclass(frozen=True)
class IsotropicCovariance:
    """``P_0 = variance * I``."""

    variance: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.variance, (int, float)) and math.isfinite(self.variance) and self.variance > 0):
            _fail("IsotropicCovariance.variance", self.variance, "a finite number > 0")

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
            _fail("DiagonalCovariance.variances", f"minimum {min(variances)}", "every variance > 0")
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
            _fail("FullCovariance.matrix", "a non-symmetric matrix", "a symmetric positive-definite matrix")
        smallest = float(np.linalg.eigvalsh(matrix).min())
        if smallest <= 0:
            _fail("FullCovariance.matrix", f"smallest eigenvalue {smallest:.3g}",
                  "a positive-definite matrix (every eigenvalue > 0)")
        object.__setattr__(self, "matrix", _as_matrix(matrix, "FullCovariance.matrix"))

    @property
    def key_dim(self) -> int:
        return len(self.matrix)

    def array(self, key_dim: int) -> np.ndarray:
        return np.asarray(self.matrix)


PriorCovariance = Union[IsotropicCovariance, DiagonalCovariance, FullCovariance]


@dataclasses.dataclass(frozen=True)
class Prior:
    """``S_0 ~ MN(0, I_V (x) P_0)``. The prior mean is zero; a filter call may start elsewhere by passing
    an ``initial_state``."""

    covariance: PriorCovariance = IsotropicCovariance(1.0)

    def __post_init__(self):
        if not isinstance(self.covariance, (IsotropicCovariance, DiagonalCovariance, FullCovariance)):
            _fail("Prior.covariance", self.covariance,
                  "IsotropicCovariance, DiagonalCovariance or FullCovariance")


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
        if self.decay is not None and not (isinstance(self.decay, (int, float)) and 0 < self.decay <= 1):
            _fail("ScalarDecay.decay", self.decay, "a number in (0, 1], or None for an input-dependent decay")
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
            if not all(0 < a <= 1 for a in decays):
                _fail("DiagonalDecay.decays", decays, "every decay in (0, 1]")
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
        if self.variance is not None and not (
            isinstance(self.variance, (int, float)) and math.isfinite(self.variance) and self.variance >= 0
        ):
            _fail("RandomWalk.variance", self.variance, "a finite number >= 0, or None for an input-dependent one")


@dataclasses.dataclass(frozen=True)
class Stationary:
    """``Q_t = P_s - A_t P_s A_t^T``: keeps ``P_s`` stationary (an AR(1) / Ornstein-Uhlenbeck memory).

    ``P_s = variance * I``, or the prior covariance when ``variance`` is None (the prior then stays the
    stationary distribution and the model forgets towards it).
    """

    variance: Optional[float] = None

    def __post_init__(self):
        if self.variance is not None and not (
            isinstance(self.variance, (int, float)) and math.isfinite(self.variance) and self.variance > 0
        ):
            _fail("Stationary.variance", self.variance, "a finite number > 0, or None for the prior covariance")


ProcessNoise = Union[NoProcessNoise, RandomWalk, Stationary]


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
        if self.precision is not None and not (
            isinstance(self.precision, (int, float)) and math.isfinite(self.precision) and self.precision > 0
        ):
            _fail("KeyValueObservation.precision", self.precision,
                  "a finite number > 0, or None for an input-dependent precision")


@dataclasses.dataclass(frozen=True)
class LatentInput:
    """No observation: a known input ``U_t = s_t v_t k_t^T`` enters the transition.

    The mean recursion is then ``M_t = M_{t-1} A_t^T + s_t v_t k_t^T`` (the additive family) and the
    covariance is data-independent. ``scaled=True`` takes ``s_t`` at run time as ``input_scale``
    ``[B, T, H]`` (Mamba-2's ``dt``); otherwise ``s_t = 1``.
    """

    scaled: bool = False


Observation = Union[KeyValueObservation, LatentInput]


# ----------------------------------------------------------------------------------------------------
# Covariance mode.


@dataclasses.dataclass(frozen=True)
class Exact:
    """Propagate the covariance exactly (the Kalman filter)."""


@dataclasses.dataclass(frozen=True)
class Reset:
    """Reset the predicted covariance to ``sigma_t^2 I`` before every update (the delta-rule family).

    The update is then the delta rule ``M_t = M_bar + eta_t (v_t - M_bar k_t) k_t^T`` with
    ``eta_t = sigma^2 beta_t / (1 + sigma^2 beta_t |k_t|^2)``.

    ``variance`` is ``sigma^2`` (fixed, > 0). With ``write_strength=True`` the run-time ``beta`` is
    ``eta_t`` itself (DeltaNet's parameterization), which is a reset exactly when
    ``0 < eta_t |k_t|^2 < 1`` (then ``sigma_t^2 = eta_t / (1 - eta_t |k_t|^2)`` in units of the
    observation noise); other write strengths are not representable and are rejected.
    """

    variance: float = 1.0
    write_strength: bool = False

    def __post_init__(self):
        if not (isinstance(self.variance, (int, float)) and math.isfinite(self.variance) and self.variance > 0):
            _fail("Reset.variance", self.variance, "a finite number > 0")


CovarianceMode = Union[Exact, Reset]
Family = Literal["additive", "reset", "exact"]
