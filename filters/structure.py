"""Structure analysis: what a declared design model *is*, as the lowerings need to know it.

The compiler never looks at a model's name. It reads the declared components and reduces them to a
`Structure`: the family (which recursion), the kind of transition, the kind of process noise, and the
constants that the declaration fixes. Every lowering is a function of the structure alone.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import numpy as np

import designmodels as dm

TransitionKind = Literal["identity", "scalar", "diagonal", "dense"]
NoiseKind = Literal["none", "random_walk", "stationary"]


@dataclasses.dataclass(frozen=True)
class Structure:
    """The facts about a design model that decide its lowering."""

    model: dm.DesignModel
    family: dm.components.Family          # "additive" | "reset" | "exact"
    transition: TransitionKind
    noise: NoiseKind
    write_strength: bool                   # reset family: the run-time beta is eta itself
    reset_variance: Optional[float]        # reset family with a fixed sigma^2

    @property
    def runtime_inputs(self):
        return self.model.runtime_inputs

    def prior_covariance(self, key_dim: int) -> np.ndarray:
        """``P_0`` as a ``K x K`` array."""
        return self.model.prior.covariance.array(key_dim)

    def stationary_covariance(self, key_dim: int) -> Optional[np.ndarray]:
        """``P_s`` of `Stationary` noise (``Q_t = P_s - A_t P_s A_t^T``), or None."""
        noise = self.model.noise
        if not isinstance(noise, dm.Stationary):
            return None
        if noise.variance is not None:
            return noise.variance * np.eye(key_dim)
        return self.prior_covariance(key_dim)


def analyze(model: dm.DesignModel) -> Structure:
    """Reduce a (validated) design model to its `Structure`."""
    if not isinstance(model, dm.DesignModel):
        hint = ""
        if isinstance(model, str):
            hint = (f"; for the named model write dm.NAMED_MODELS[{model!r}]()" if model in dm.NAMED_MODELS
                    else f"{dm.did_you_mean(model, dm.NAMED_MODELS)}; named models: {', '.join(dm.NAMED_MODELS)}")
        elif callable(model) and getattr(model, "__name__", None) in dm.NAMED_MODELS:
            hint = f"; call it: dm.{model.__name__}()"
        raise TypeError(f"filters.compile: expected a designmodels.DesignModel, got {type(model).__name__} "
                        f"{model!r:.80}{hint}.")
    transition = {
        dm.Identity: "identity", dm.ScalarDecay: "scalar", dm.DiagonalDecay: "diagonal",
        dm.DenseTransition: "dense",
    }[type(model.transition)]
    noise = {dm.NoProcessNoise: "none", dm.RandomWalk: "random_walk", dm.Stationary: "stationary"}[
        type(model.noise)]
    if noise == "random_walk" and model.noise.variance == 0:
        noise = "none"
    reset = model.covariance if isinstance(model.covariance, dm.Reset) else None
    return Structure(
        model=model, family=model.family, transition=transition, noise=noise,
        write_strength=bool(reset and reset.write_strength),
        reset_variance=None if reset is None or reset.write_strength else float(reset.variance),
    )
