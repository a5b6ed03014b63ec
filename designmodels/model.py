"""`DesignModel`: the composition of the components, checked as a whole, and its run-time interface."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from designmodels import components as c
from designmodels import structure as st
from designmodels.components import DesignModelError
from designmodels.structure import Domain, InputSpec


@dataclasses.dataclass(frozen=True)
class DesignModel:
    """A declared model of memory; `filters.compile` derives the filter from its structure.

    The three families follow from the declaration, never from ``name``:

    * ``additive``: a `LatentInput`; ``S_t = A_t S_{t-1} + s_t k_t v_t^T`` (linear attention, RetNet,
      GLA, Mamba-2);
    * ``reset``: a `KeyValueObservation` under `Reset`; the delta rule (DeltaNet, Gated DeltaNet,
      Longhorn);
    * ``exact``: a `KeyValueObservation` under `Exact`; the Kalman filter (the Bayesian Layer).
    """

    prior: c.Prior = c.Prior()
    transition: c.Transition = c.Identity()
    noise: c.ProcessNoise = c.NoProcessNoise()
    observation: c.Observation = c.KeyValueObservation()
    covariance: c.CovarianceMode = c.Exact()
    name: Optional[str] = None

    def __post_init__(self):
        _check_type("DesignModel.prior", self.prior, (c.Prior,))
        _check_type("DesignModel.transition", self.transition,
                    (c.Identity, c.ScalarDecay, c.DiagonalDecay, c.DenseTransition))
        _check_type("DesignModel.noise", self.noise, (c.NoProcessNoise, c.RandomWalk, c.Stationary,
                                                                  c.KeyNoise))
        _check_type("DesignModel.observation", self.observation, (c.KeyValueObservation, c.LatentInput))
        _check_type("DesignModel.covariance", self.covariance, (c.Exact, c.Reset))
        if isinstance(self.observation, c.LatentInput) and isinstance(self.covariance, c.Reset):
            raise DesignModelError(
                "DesignModel.covariance: Reset needs an observation to update on, but the observation is a "
                "LatentInput (the additive family); accepted: Exact() with LatentInput, or Reset with "
                "KeyValueObservation.")
        if isinstance(self.covariance, c.Reset):
            if not isinstance(self.noise, c.NoProcessNoise):
                raise DesignModelError(
                    f"DesignModel.noise: got {self.noise!r}, but Reset overwrites the predicted covariance, so "
                    "process noise would be ignored; accepted: NoProcessNoise() with Reset.")
            if self.covariance.write_strength and self.observation.precision is not None:
                raise DesignModelError(
                    "DesignModel.observation.precision: Reset(write_strength=True) takes the write strength "
                    f"at run time as `beta`, so a fixed precision ({self.observation.precision}) would be "
                    "ignored; accepted: KeyValueObservation(precision=None).")
        if isinstance(self.noise, c.Stationary):
            if isinstance(self.transition, c.DenseTransition):
                raise DesignModelError(
                    "DesignModel.noise: Stationary noise Q = P_s - A P_s A^T is positive semi-definite only "
                    "when A contracts P_s, which a dense transition does not guarantee; accepted: Stationary "
                    "with Identity, ScalarDecay or DiagonalDecay, or RandomWalk with DenseTransition.")
            if (isinstance(self.transition, c.DiagonalDecay) and self.noise.variance is None
                    and isinstance(self.prior.covariance, c.FullCovariance)):
                raise DesignModelError(
                    "DesignModel.noise: Stationary noise P_0 - D P_0 D is not positive semi-definite for "
                    "every full P_0 and diagonal decay D; accepted: an isotropic or diagonal prior, or "
                    "Stationary(variance=...).")
        if self.name is not None and not isinstance(self.name, str):
            raise DesignModelError(f"DesignModel.name: got {self.name!r}; accepted: a string or None.")
        dims = {f: getattr(obj, "key_dim", None) for f, obj in (
            ("prior.covariance", self.prior.covariance), ("transition", self.transition))}
        fixed = {f: d for f, d in dims.items() if d is not None}
        if len(set(fixed.values())) > 1:
            said = " but ".join(f"{f} fixes K = {d}" for f, d in fixed.items())
            raise DesignModelError(
                f"DesignModel: the components fix different key dimensions ({said}); accepted: one key "
                "dimension K for every component that fixes one (give them vectors / matrices of one length).")

    # ------------------------------------------------------------------------------------------------
    @property
    def family(self) -> c.Family:
        if isinstance(self.observation, c.LatentInput):
            return "additive"
        return "reset" if isinstance(self.covariance, c.Reset) else "exact"

    @property
    def key_dim(self) -> Optional[int]:
        """The key dimension fixed by the declaration, or None if any ``K`` works."""
        for obj in (self.prior.covariance, self.transition):
            if getattr(obj, "key_dim", None) is not None:
                return obj.key_dim
        return None

    @property
    def runtime_inputs(self) -> dict[str, InputSpec]:
        """The gates the compiled filter takes besides ``q, k, v``, by keyword."""
        specs = []
        t = self.transition
        if isinstance(t, c.ScalarDecay) and t.decay is None:
            specs.append(InputSpec("log_decay", (), "log a_t <= 0 (a decay in (0, 1])", Domain.LOG_DECAY,
                                   required=t.required))
        elif isinstance(t, c.DiagonalDecay) and t.decays is None:
            specs.append(InputSpec("log_decay", ("K",), "log a_t <= 0 (decays in (0, 1])", Domain.LOG_DECAY))
        elif isinstance(t, c.DenseTransition) and t.matrix is None:
            specs.append(InputSpec("transition", ("K", "K"), "finite K x K matrices", Domain.TRANSITION))
        if isinstance(self.noise, (c.RandomWalk, c.KeyNoise)) and self.noise.variance is None:
            specs.append(InputSpec("process_noise", (), "finite q_t >= 0", Domain.PROCESS_NOISE))
        obs = self.observation
        if isinstance(obs, c.LatentInput) and obs.scaled:
            specs.append(InputSpec("input_scale", (), "finite s_t", Domain.INPUT_SCALE))
        if isinstance(obs, c.KeyValueObservation) and obs.precision is None:
            if isinstance(self.covariance, c.Reset) and self.covariance.write_strength:
                specs.append(InputSpec("beta", (), "write strength with 0 <= beta_t |k_t|^2 < 1",
                                       Domain.WRITE_STRENGTH))
            else:
                specs.append(InputSpec("beta", (), "precision beta_t > 0, finite", Domain.PRECISION))
        return {s.name: s for s in specs}

    @property
    def structure(self) -> st.Structure:
        """The typed facts that decide the filter, its checks and its layer (`designmodels.structure`)."""
        return st.analyze(self)

    def describe(self) -> str:
        """One line per component, as declared."""
        return "\n".join([
            f"DesignModel {self.name or '(user-declared)'}: {self.family} family",
            f"  prior       {_short(self.prior.covariance)}",
            f"  transition  {self.transition}",
            f"  noise       {self.noise}",
            f"  observation {self.observation}",
            f"  covariance  {self.covariance}",
        ])


def _short(covariance) -> str:
    """A prior covariance in one readable line: a full matrix by its size and spectrum."""
    if isinstance(covariance, c.FullCovariance):
        eigenvalues = np.linalg.eigvalsh(np.asarray(covariance.matrix))
        return (f"FullCovariance({len(covariance.matrix)} x {len(covariance.matrix)}, eigenvalues "
                f"{eigenvalues.min():.4g} .. {eigenvalues.max():.4g})")
    return str(covariance)


def _check_type(field: str, value, accepted: tuple) -> None:
    if not isinstance(value, accepted):
        names = ", ".join(t.__name__ for t in accepted)
        hint = ""
        if isinstance(value, type) and issubclass(value, accepted):
            hint = f" (the class itself: make an instance, {value.__name__}(...))"
        elif field == "DesignModel.prior" and isinstance(value, (c.IsotropicCovariance, c.DiagonalCovariance,
                                                                  c.FullCovariance)):
            hint = f" (wrap the covariance: prior=Prior({value!r}))"
        raise DesignModelError(f"{field}: got {value!r}; accepted: an instance of {names}{hint}.")
