"""Structure analysis: what a declared design model *is*, as typed facts.

The compiler, the layers and the tests never look at a model's name, and nothing outside this package
reads its components: `analyze` reduces a declaration to a `Structure` once, and everything downstream
decides from that. A structure holds

* the family (which recursion: ``additive``, ``reset`` or ``exact``), the kind of transition
  (``identity``, ``scalar``, ``diagonal``, ``dense``) and of process noise (``none``, ``random_walk``,
  ``stationary``, ``key``: `KeyNoise`'s ``q_t k_t k_t^T``);
* the constants the declaration fixes, as numbers or arrays: the prior covariance ``P_0`` and the
  stationary covariance ``P_s`` (each a `KeyCovariance`), a fixed transition (as log decays, or a
  matrix), a fixed process noise variance, a fixed precision, the reset variance ``sigma^2``;
* each run-time input (`InputSpec`) with its `Domain`: what its values mean and which are valid.

A structure is hashable (every field is a number, a string, a tuple or an enum), so it can be a static
argument of ``jax.jit``.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Literal, Optional, Union

import numpy as np

from designmodels import components as c

Family = c.Family                                       # "additive" | "reset" | "exact"
TransitionKind = Literal["identity", "scalar", "diagonal", "dense"]
NoiseKind = Literal["none", "random_walk", "stationary", "key"]


class Domain(enum.Enum):
    """What a run-time input's values are; the input checks, the layers' gate heads and the tests'
    input generators decide by it (the value is a description in words)."""

    LOG_DECAY = "log decays log a_t <= 0"
    TRANSITION = "finite K x K transition matrices"
    PROCESS_NOISE = "process noise variances q_t >= 0"
    INPUT_SCALE = "finite input scales s_t"
    PRECISION = "observation precisions beta_t > 0"
    WRITE_STRENGTH = "delta-rule steps eta_t = beta_t with 0 <= beta_t |k_t|^2 < 1"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A quantity the compiled filter takes at run time.

    ``trailing`` is the shape after ``[B, T, H]``: ``()`` per head, ``("K",)`` per key channel,
    ``("K", "K")`` a matrix. ``accepted`` says which values are valid, in words (for messages);
    ``domain`` says it as a `Domain` (for code).
    """

    name: str
    trailing: tuple
    accepted: str
    domain: Domain
    required: bool = True


@dataclasses.dataclass(frozen=True)
class KeyCovariance:
    """A ``K x K`` covariance that the declaration fixes: ``variance * I`` (isotropic: any ``K``), or a
    fixed matrix (nested tuples; a diagonal or full prior)."""

    variance: Optional[float] = None
    matrix: Optional[tuple] = None

    @property
    def isotropic(self) -> bool:
        return self.matrix is None

    def array(self, key_dim: int) -> np.ndarray:
        """The covariance as a ``K x K`` float64 array."""
        if self.isotropic:
            return self.variance * np.eye(key_dim)
        return np.asarray(self.matrix, dtype=np.float64)


FixedTransition = Union[None, float, tuple]
"""A fixed transition: None (identity, or given at run time), ``log a`` (scalar kind), a tuple of ``log a_j``
(diagonal kind) or a ``K x K`` matrix as nested tuples (dense kind)."""


@dataclasses.dataclass(frozen=True)
class Structure:
    """The facts about a design model that decide its lowering, its checks and its layer (module doc)."""

    name: Optional[str]                      # for messages only; never decides anything
    family: Family
    transition: TransitionKind
    noise: NoiseKind
    key_dim: Optional[int]                   # fixed by the declaration, or None: any K
    inputs: tuple                            # the run-time inputs, InputSpec each, in declaration order
    prior: KeyCovariance                     # P_0
    stationary: Optional[KeyCovariance]      # P_s of Stationary noise (Q_t = P_s - A_t P_s A_t^T), else None
    fixed_transition: FixedTransition        # see FixedTransition; None when given at run time
    fixed_process_noise: Optional[float]     # q of RandomWalk(q) or KeyNoise(q), q > 0; None: run time, or none
    fixed_precision: Optional[float]         # beta of KeyValueObservation(beta); None: run time, or none
    reset_variance: Optional[float]          # sigma^2 of Reset(sigma^2) (reset family, fixed variance)
    write_strength: bool                     # reset family: the run-time beta is the step eta itself

    @property
    def runtime_inputs(self) -> dict[str, InputSpec]:
        """The run-time inputs by name."""
        return {spec.name: spec for spec in self.inputs}

    def prior_covariance(self, key_dim: int) -> np.ndarray:
        """``P_0`` as a ``K x K`` array."""
        return self.prior.array(key_dim)

    def stationary_covariance(self, key_dim: int) -> Optional[np.ndarray]:
        """``P_s`` of `Stationary` noise as a ``K x K`` array, or None."""
        return None if self.stationary is None else self.stationary.array(key_dim)


def _key_covariance(covariance) -> KeyCovariance:
    if isinstance(covariance, c.IsotropicCovariance):
        return KeyCovariance(variance=covariance.variance)
    return KeyCovariance(matrix=tuple(map(tuple, covariance.array(covariance.key_dim).tolist())))


def _fixed_transition(transition) -> FixedTransition:
    if isinstance(transition, c.ScalarDecay) and transition.decay is not None:
        return float(np.log(transition.decay))
    if isinstance(transition, c.DiagonalDecay) and transition.decays is not None:
        return tuple(float(x) for x in np.log(transition.decays))
    if isinstance(transition, c.DenseTransition) and transition.matrix is not None:
        return transition.matrix
    return None


def analyze(model) -> Structure:
    """Reduce a (validated) `DesignModel` to its `Structure`: the one place that reads the components."""
    transition = {
        c.Identity: "identity", c.ScalarDecay: "scalar", c.DiagonalDecay: "diagonal",
        c.DenseTransition: "dense",
    }[type(model.transition)]
    noise = {c.NoProcessNoise: "none", c.RandomWalk: "random_walk", c.Stationary: "stationary",
             c.KeyNoise: "key"}[type(model.noise)]
    if noise in ("random_walk", "key") and model.noise.variance == 0:
        noise = "none"
    prior = _key_covariance(model.prior.covariance)
    stationary = None
    if noise == "stationary":
        stationary = prior if model.noise.variance is None else KeyCovariance(variance=model.noise.variance)
    reset = model.covariance if isinstance(model.covariance, c.Reset) else None
    observation = model.observation
    return Structure(
        name=model.name, family=model.family, transition=transition, noise=noise, key_dim=model.key_dim,
        inputs=tuple(model.runtime_inputs.values()), prior=prior, stationary=stationary,
        fixed_transition=_fixed_transition(model.transition),
        fixed_process_noise=model.noise.variance if noise in ("random_walk", "key") else None,
        fixed_precision=getattr(observation, "precision", None),
        reset_variance=None if reset is None or reset.write_strength else float(reset.variance),
        write_strength=bool(reset and reset.write_strength),
    )
